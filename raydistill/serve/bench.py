"""Load benchmark of the served teacher and student (``raydistill bench-serve``,
``benchmarks/serve_ab.py``). Requests go through ``serve.client`` (``run_requests``, whose
docstring gives each request's figures: latency, time to first token, usage, the answering arm);
this module chooses the prompts, drives the load, computes the figures and writes the report.

The endpoint is the one ``raydistill serve`` runs: the OpenAI API on
``http://{serve.host}:{serve.port}/v1`` with the models ``teacher`` and ``student`` (any
OpenAI-compatible server that serves those two names will do, e.g. vLLM's own with
``--served-model-name teacher student``). Nothing here starts or stops it.

The benchmark (``run_bench``), for each concurrency level of ``serve.bench.concurrency`` and each
arm: ``requests_per_level`` requests (the prompts of the corpus split ``serve.bench.split``, a
seeded sample spread over the task types, reused in turn when the split is smaller), sent by
``concurrency`` clients that each send their next request when the previous one is answered.
Arms are interleaved within a level: the level's requests are cut into ``parts`` (up to 4; each part
holds at least ``concurrency`` requests per arm) and the arms take turns part by part (teacher then
student, then student then teacher, ...), so a change of background load falls on both. One
warm-up request per arm before the first level is not counted.

Figures per arm and level (``arm_stats``): ``latency_ms_p50/p95/p99`` and ``ttft_ms_p50/p95``
over the answered requests (linear-interpolated percentiles, as numpy's default); ``requests_per_s``
= answered requests / the arm's wall time (the sum of its parts' wall times: first request sent →
last answer); ``output_tokens_per_s`` = output tokens of the answered requests / the same wall
time; ``errors`` and ``first_error``. Ratios per level: ``latency_ratio`` = student p50 latency /
teacher p50 latency, ``throughput_ratio`` = student output tokens/s / teacher output tokens/s.

Overhead (``measure_overhead``): the student model in a vLLM engine in this process
(``vllm.LLM``, the engine settings of ``serve.student``: dtype, max_model_len, tensor parallel
size, KV cache, eager on CPU) against the served ``student``, one request at a time,
``overhead_requests`` requests each, alternating in-process and served with a pause of
``OVERHEAD_GAP_S`` before each (one warm-up each, not counted): ``overhead`` = served p50 latency / in-process p50 latency (target ≤ 1.05; reported, never
asserted). The served side streams through ``serve.client``; the in-process side is
``LLM.chat`` (chat template, tokenizing and generation; no HTTP). ``serve.bench.overhead_requests:
0`` skips it (no third engine on the machine); an engine that fails to start leaves ``overhead``
null with the error in ``overhead_detail.error``.

Written under ``<output_dir>/bench/`` (local or ``s3://``, ``write_report``): ``serve.md`` (tables per level and arm, ratios, overhead,
the machine and settings), ``serve.json`` (everything ``run_bench`` returns), ``serve.png``
(latency p50/p95 and output tokens/s against concurrency, both arms) and ``config.yaml`` (the
resolved config).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path

from ..config import Config
from ..stats import percentile, ratio
from . import ARMS
from .client import (
    REQUEST_TIMEOUT_S,
    RequestRecord,
    api_key,
    check_endpoint,
    check_served_models,
    endpoint_url,
    run_requests,
)

log = logging.getLogger(__name__)

#: Most parts a level is cut into for interleaving the arms.
MAX_PARTS = 4
#: Pause (s) before each overhead request: an engine that just finished keeps its OpenMP threads
#: spinning for a while on CPU (measured here: the next request on the other engine ran ≈ 2× slower
#: without it), so each request starts on an idle machine.
OVERHEAD_GAP_S = 0.5


# ----------------------------------------------------------------------------- statistics

def arm_stats(records: list[RequestRecord], wall_s: float) -> dict:
    """Figures of one arm at one level.

    Args:
        records: every request sent (failed ones included).
        wall_s: the arm's wall time at this level (s): the sum of its parts' wall times.
    Returns:
        ``via`` (``"direct"``: the requests named their arm, so the endpoint's metrics count them
        apart from A/B users, ``serve.routing.request_via``; None without records),
        ``requests`` (sent), ``answered``, ``errors``, ``first_error`` (None without errors),
        ``latency_ms_p50/p95/p99`` and ``ttft_ms_p50/p95`` (ms, over answered requests; None
        without any), ``requests_per_s`` (answered / wall_s), ``output_tokens`` (sum over answered
        requests that reported usage), ``output_tokens_per_s`` (output_tokens / wall_s),
        ``mean_output_tokens``, ``usage_missing`` (answered requests without usage) and ``wall_s``.
    """
    ok = [r for r in records if r.ok and r.latency_s is not None]
    lat = [r.latency_s * 1000 for r in ok]
    ttft = [r.ttft_s * 1000 for r in ok if r.ttft_s is not None]
    counted = [r.output_tokens for r in ok if r.output_tokens is not None]
    tokens = sum(counted)
    errors = [r for r in records if not r.ok]
    from .routing import request_via

    vias = sorted({request_via(r.arm) for r in records})
    return {
        "via": "+".join(vias) or None, "requests": len(records), "answered": len(ok), "errors": len(errors),
        "first_error": errors[0].error if errors else None,
        "latency_ms_p50": percentile(lat, 50), "latency_ms_p95": percentile(lat, 95),
        "latency_ms_p99": percentile(lat, 99),
        "ttft_ms_p50": percentile(ttft, 50), "ttft_ms_p95": percentile(ttft, 95),
        "requests_per_s": len(ok) / wall_s if wall_s > 0 and ok else None,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / wall_s if wall_s > 0 and counted else None,
        "mean_output_tokens": tokens / len(counted) if counted else None,
        "usage_missing": len(ok) - len(counted),
        "wall_s": wall_s,
    }


def level_ratios(arms: dict[str, dict]) -> dict:
    """Student / teacher ratios of one level: ``latency_ratio`` (p50 latency) and
    ``throughput_ratio`` (output tokens/s); None where either figure is missing."""
    s, t = arms["student"], arms["teacher"]
    return {"latency_ratio": ratio(s["latency_ms_p50"], t["latency_ms_p50"]),
            "throughput_ratio": ratio(s["output_tokens_per_s"], t["output_tokens_per_s"])}


def split_parts(n: int, concurrency: int) -> list[tuple[int, int]]:
    """(start, stop) of the parts a level of ``n`` requests per arm is cut into:
    ``min(MAX_PARTS, n // (2 * concurrency))`` parts (at least 1) of nearly equal size, so that in
    each part every client sends at least two requests (sustained load, not one burst)."""
    k = max(1, min(MAX_PARTS, n // max(1, 2 * concurrency)))
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(k)]


# ----------------------------------------------------------------------------- inputs

def bench_prompts(cfg: Config, n: int) -> tuple[list[list[dict]], int]:
    """(``n`` chat message lists, how many distinct prompts they hold) from the corpus split
    ``serve.bench.split`` (``corpus/prompts/``, written by generate): a sample spread over the task
    types (seed ``data.seed``), reused in turn when the split holds fewer than ``n``.

    Raises FileNotFoundError without a finished corpus, ValueError when the split is empty."""
    from ..corpus import read_prompts
    from ..data import sample_by_task
    from ..layout import corpus_location

    split = cfg.serve.bench.split
    corpus = corpus_location(cfg)  # local or s3://
    table = read_prompts(corpus, (split,))
    if table.num_rows == 0:
        raise ValueError(f"the {split} split of {corpus / 'prompts'} is empty: set serve.bench.split "
                         f"to a split that has prompts, or raise data.split.{split} and rerun `raydistill generate`")
    table = sample_by_task(table, n, cfg.data.seed)
    msgs = [[{"role": m["role"], "content": m["content"]} for m in row] for row in table.column("messages").to_pylist()]
    return [msgs[i % len(msgs)] for i in range(n)], len(msgs)


def _served_student_path(cfg: Config) -> str:
    """The student the endpoint serves by this config (``serve.app.arm_refs``: ``serve.student.model``
    or ``<output_dir>/student``) as a local folder for the in-process engine. Raises ValueError for
    an ``s3://`` model (not downloaded here), ``models.ModelError`` for a missing folder."""
    from ..models import resolve_model
    from .app import arm_refs

    ref = arm_refs(cfg)["student"]
    if ref.startswith("s3://"):
        raise ValueError(f"the served student is {ref}: the in-process engine takes a local folder or hub id")
    return resolve_model(ref)


def machine() -> dict:
    """The machine the figures come from: platform, CPU count, memory (GiB), GPUs, load average."""
    info: dict = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                  "cpus": os.cpu_count(), "load_avg": [round(x, 2) for x in os.getloadavg()]}
    try:
        with open("/proc/meminfo") as f:
            kib = int(next(line for line in f if line.startswith("MemTotal:")).split()[1])
        info["memory_gib"] = round(kib / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        info["memory_gib"] = None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    info["cuda_visible_devices"] = visible
    return info


# ----------------------------------------------------------------------------- overhead

def _inprocess_engine(cfg: Config, model: str):
    """(``vllm.LLM`` on ``model``, its engine kwargs): the served student's own engine kwargs
    (``serve.app.llm_config``: dtype, max_model_len, eager on CPU; tensor parallel size and GPU
    memory share on GPUs) and its vLLM environment (``runtime.vllm_env``: KV cache, CPU threads)."""
    from ..runtime import vllm_env
    from .app import llm_config

    arm = cfg.serve.student
    engine_kwargs = dict(llm_config("student", model, arm)["engine_kwargs"])
    os.environ.update(vllm_env(arm.kv_cache_gib, here=True))  # read by the engine process vLLM starts, here
    from vllm import LLM

    return LLM(model=model, disable_log_stats=True, **engine_kwargs), engine_kwargs


def _shutdown_engine(llm) -> None:
    import gc

    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # best effort: the process may be ending anyway
        log.debug("bench: engine shutdown", exc_info=True)
    del llm
    gc.collect()


def measure_overhead(cfg: Config, base_url: str, prompts: list[list[dict]], sampling: dict) -> dict:
    """Served ``student`` vs the same model in an in-process vLLM engine, one request at a time,
    alternating (see module docstring). Returns ``overhead`` (served p50 / in-process p50 latency,
    None when not measured), ``added_ms_p50`` (served p50 − in-process p50, ms: Serve's cost per
    request, which the ratio divides by the answer's length), ``inprocess`` and ``served`` (``latency_ms_p50``, ``latency_ms_p95``,
    ``mean_output_tokens``, ``requests``, ``errors``), ``same_text_share`` (share of prompts the two
    answered with the same text), ``model``, ``engine_kwargs``, ``startup_s`` and ``error`` (why
    overhead is None, else None)."""
    n = cfg.serve.bench.overhead_requests
    key = api_key(cfg)
    out: dict = {"overhead": None, "requests": n, "error": None, "model": None}
    if n == 0:
        out["error"] = "skipped: serve.bench.overhead_requests is 0"
        return out
    try:
        model = _served_student_path(cfg)
        out["model"] = model
        if not (Path(model) / "config.json").is_file():
            raise FileNotFoundError(f"no model folder at {model} (serve.student.model or <output_dir>/student)")
        t0 = time.perf_counter()
        llm, out["engine_kwargs"] = _inprocess_engine(cfg, model)
        out["startup_s"] = round(time.perf_counter() - t0, 2)
    except Exception as e:  # the load figures are measured already: report, do not fail
        log.error("bench: the in-process engine did not start (%s: %s); overhead is not measured",
                  type(e).__name__, e)
        out["error"] = f"in-process engine: {type(e).__name__}: {str(e)[:500]}"
        return out
    try:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=sampling["max_tokens"], temperature=sampling.get("temperature", 0.0))

        def inprocess(messages) -> tuple[float, str, int]:
            t = time.perf_counter()
            res = llm.chat(messages, params, use_tqdm=False)[0].outputs[0]
            return time.perf_counter() - t, res.text, len(res.token_ids)

        inprocess(prompts[0])  # warm-ups, not counted
        run_requests(base_url, "student", [prompts[0]], 1, sampling, key=key)
        local: list[tuple[float, str, int]] = []
        served: list[RequestRecord] = []
        for i in range(n):
            msgs = prompts[i % len(prompts)]
            for side in ("inprocess", "served") if i % 2 == 0 else ("served", "inprocess"):
                time.sleep(OVERHEAD_GAP_S)
                if side == "inprocess":
                    local.append(inprocess(msgs))
                else:
                    served += run_requests(base_url, "student", [msgs], 1, sampling, first_index=i, key=key)[0]
    finally:
        _shutdown_engine(llm)
    ok = [r for r in served if r.ok]
    lat_local = [s * 1000 for s, _, _ in local]
    lat_served = [r.latency_s * 1000 for r in ok]
    out["inprocess"] = {"requests": len(local), "errors": 0, "latency_ms_p50": percentile(lat_local, 50),
                        "latency_ms_p95": percentile(lat_local, 95),
                        "mean_output_tokens": sum(k for _, _, k in local) / len(local) if local else None}
    counted = [r.output_tokens for r in ok if r.output_tokens is not None]
    out["served"] = {"requests": len(served), "errors": len(served) - len(ok),
                     "first_error": next((r.error for r in served if not r.ok), None),
                     "latency_ms_p50": percentile(lat_served, 50), "latency_ms_p95": percentile(lat_served, 95),
                     "mean_output_tokens": sum(counted) / len(counted) if counted else None}
    pairs = [(local[r.index][1], r.text) for r in ok if r.index < len(local)]
    out["same_text_share"] = sum(a.strip() == b.strip() for a, b in pairs) / len(pairs) if pairs else None
    out["overhead"] = ratio(out["served"]["latency_ms_p50"], out["inprocess"]["latency_ms_p50"])
    if out["overhead"] is not None:
        out["added_ms_p50"] = out["served"]["latency_ms_p50"] - out["inprocess"]["latency_ms_p50"]
    if out["overhead"] is None:
        out["error"] = f"no served answer to compare: {out['served']['first_error']}"
    return out


# ----------------------------------------------------------------------------- the benchmark

def run_levels(base_url: str, prompts: list[list[dict]], levels: list[int], sampling: dict,
               arms: tuple[str, ...] = ARMS, timeout_s: float = REQUEST_TIMEOUT_S, key: str | None = None) -> list[dict]:
    """The load part of the benchmark: for each level, every arm gets all of ``prompts`` at that
    concurrency, the arms taking turns part by part (``split_parts``); ``key``: the endpoint's API
    key (``api_key``). Returns one dict per level:
    ``concurrency``, ``parts``, ``arms`` (arm → ``arm_stats``), ``latency_ratio``,
    ``throughput_ratio``."""
    for arm in arms:  # warm-up, not counted
        run_requests(base_url, arm, prompts[:1], 1, sampling, timeout_s, key=key)
    out = []
    for level in levels:
        records: dict[str, list[RequestRecord]] = {a: [] for a in arms}
        wall = {a: 0.0 for a in arms}
        parts = split_parts(len(prompts), level)
        for p, (start, stop) in enumerate(parts):
            order = arms if p % 2 == 0 else tuple(reversed(arms))
            for arm in order:
                recs, w = run_requests(base_url, arm, prompts[start:stop], level, sampling, timeout_s, start, key)
                records[arm] += recs
                wall[arm] += w
        stats = {a: arm_stats(records[a], wall[a]) for a in arms}
        row = {"concurrency": level, "parts": len(parts), "arms": stats, **level_ratios(stats)}
        log.info("bench: concurrency %d: %s", level, ", ".join(
            f"{a} p50 {_fmt(s['latency_ms_p50'], 0)} ms, {_fmt(s['output_tokens_per_s'], 1)} tok/s, "
            f"{s['errors']} errors" for a, s in stats.items()))
        out.append(row)
    return out


def run_bench(cfg: Config) -> dict:
    """Benchmark the running endpoint and write ``<output_dir>/bench/`` (see module docstring).

    Returns the ``serve.json`` dict: ``overhead`` (float or None), ``latency_ratio`` and
    ``throughput_ratio`` at the highest concurrency level (``ratio_level``), ``per_level`` (level →
    both ratios), ``levels`` (raw figures per level and arm), ``overhead_detail``, ``settings``,
    ``machine``, ``endpoint``, ``served_models`` and ``files`` (``write_report``).

    Raises EndpointError when nothing answers on ``serve.host:serve.port`` or it lacks ``teacher`` or
    ``student``; FileNotFoundError without a finished corpus; ValueError for an empty split; OSError
    when ``<output_dir>/bench/`` cannot be written.
    """
    from ..runtime import finite, provenance
    from .app import arm_refs

    b = cfg.serve.bench
    base_url = endpoint_url(cfg)
    key = api_key(cfg)
    served = check_endpoint(base_url, key=key)
    fingerprints = check_served_models(cfg, base_url)  # the figures are of this config's models
    prompts, distinct = bench_prompts(cfg, b.requests_per_level)
    sampling = {"max_tokens": b.max_tokens, "temperature": 0.0}
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    load_start = machine()["load_avg"]
    log.info("bench: %s serves %s; %d requests per arm at concurrency %s (%d distinct %s prompts)", base_url,
             served, b.requests_per_level, b.concurrency, distinct, b.split)
    t0 = time.perf_counter()
    levels = run_levels(base_url, prompts, b.concurrency, sampling, key=key)
    load_wall = time.perf_counter() - t0
    overhead = measure_overhead(cfg, base_url, prompts, sampling)
    top = levels[-1]
    result = {
        "overhead": overhead["overhead"],
        "latency_ratio": top["latency_ratio"], "throughput_ratio": top["throughput_ratio"],
        "ratio_level": top["concurrency"],
        "per_level": {str(lv["concurrency"]): {"latency_ratio": lv["latency_ratio"],
                                              "throughput_ratio": lv["throughput_ratio"]} for lv in levels},
        "levels": levels,
        "overhead_detail": overhead,
        "endpoint": base_url, "served_models": served, "model_fingerprints": fingerprints,
        "settings": {"concurrency": list(b.concurrency), "requests_per_level": b.requests_per_level,
                     "max_tokens": b.max_tokens, "temperature": 0.0, "stream": True, "split": b.split,
                     "distinct_prompts": distinct, "overhead_requests": b.overhead_requests,
                     "warmup_requests_per_arm": 1, "request_timeout_s": REQUEST_TIMEOUT_S,
                     **arm_refs(cfg)},
        "machine": {**machine(), "load_avg_start": load_start}, "started": started,
        "load_wall_s": round(load_wall, 2), "provenance": provenance(),
    }
    return write_report(cfg, finite(result))


def write_report(cfg: Config, result: dict) -> dict:
    """Write ``<output_dir>/bench/`` (local or ``s3://``, as every stage): ``config.yaml``,
    ``serve.png``, ``serve.md`` and ``serve.json`` (written last: a folder without it is unfinished).
    The files are made in a local folder (``bench/`` itself, or a temporary one for S3, then
    uploaded in that order). Sets and returns ``result`` with ``files`` (``json``, ``markdown``,
    ``plot``: their URIs; ``plot`` absent and ``plot_error`` set when the figure failed).

    Raises OSError when the folder cannot be written (S3 errors name the bucket)."""
    import shutil
    import tempfile

    from ..layout import bench_location

    dest = bench_location(cfg)
    local = Path(tempfile.mkdtemp(prefix="raydistill-bench-")) if dest.remote else dest.local()
    local.mkdir(parents=True, exist_ok=True)
    try:
        files = {"json": (dest / "serve.json").uri, "markdown": (dest / "serve.md").uri,
                 "plot": (dest / "serve.png").uri}
        result["files"] = files
        (local / "config.yaml").write_text(cfg.dump())
        try:
            write_plot(result, local / "serve.png")
        except Exception as e:  # a figure must not cost the figures
            log.exception("bench: plot failed")
            result["plot_error"] = f"{type(e).__name__}: {e}"
            files.pop("plot")
        (local / "serve.md").write_text(markdown(result))
        report = json.dumps(result, indent=2, allow_nan=False)
        if dest.remote:
            (dest / "serve.json").delete()  # an earlier finished report must not outlive a half-made folder
            for name in ("config.yaml", "serve.png", "serve.md"):
                if (local / name).is_file():
                    (dest / name).write_bytes((local / name).read_bytes())
            (dest / "serve.json").write_text(report)
        else:
            (local / "serve.json").write_text(report)
    finally:
        if dest.remote:
            shutil.rmtree(local, ignore_errors=True)
    log.info("bench: wrote %s", dest.uri)
    return result


def summary_line(result: dict) -> str:
    """The one-line JSON the command prints last: ``overhead``, ``latency_ratio`` and
    ``throughput_ratio`` (at ``ratio_level``, the highest concurrency), ``per_level`` and the raw
    figures (``levels``, ``overhead_detail``, ``settings``, ``machine``)."""
    keys = ("overhead", "latency_ratio", "throughput_ratio", "ratio_level", "per_level", "levels",
            "overhead_detail", "settings", "machine", "endpoint", "files")
    return json.dumps({k: result.get(k) for k in keys}, allow_nan=False)


# ----------------------------------------------------------------------------- report

def _fmt(v, digits: int = 1) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return f"{v:,.{digits}f}"


def markdown(result: dict) -> str:
    """serve.md: settings and machine, a table per level and arm, the ratios, the overhead, errors."""
    s, m, o = result["settings"], result["machine"], result["overhead_detail"]
    lines = ["# Serve benchmark: teacher vs student through the endpoint", "",
             f"Endpoint `{result['endpoint']}` (serves {', '.join(result['served_models'])}), started "
             f"{result['started']}. Teacher `{s['teacher']}`, student `{s['student']}` (as configured; the "
             "endpoint serves what `raydistill serve` was started with).", "",
             f"Settings: concurrency {s['concurrency']}, {s['requests_per_level']} requests per arm and level "
             f"({s['distinct_prompts']} distinct prompts of the `{s['split']}` split), max_tokens {s['max_tokens']}, "
             "temperature 0, streaming with usage; arms interleaved part by part within each level; one warm-up "
             "request per arm not counted.", "",
             f"Machine: {m['platform']}, {m['cpus']} CPUs, {_fmt(m.get('memory_gib'))} GiB; load average "
             f"{m['load_avg_start']} at the start, {m['load_avg']} at the end.", "",
             "## Per level and arm", "",
             "Every request names its arm (`model: teacher|student`), so the endpoint's metrics tag it "
             "`via=\"direct\"`, apart from A/B users (`model: ab`, `via=\"ab\"`).", "",
             "| concurrency | arm | via | requests | errors | latency p50 (ms) | p95 (ms) | p99 (ms) | TTFT p50 (ms) | "
             "TTFT p95 (ms) | requests/s | output tokens/s | mean output tokens |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for lv in result["levels"]:
        for arm, a in lv["arms"].items():
            lines.append(f"| {lv['concurrency']} | {arm} | {a.get('via')} | {a['requests']} | {a['errors']} | "
                         f"{_fmt(a['latency_ms_p50'])} | {_fmt(a['latency_ms_p95'])} | {_fmt(a['latency_ms_p99'])} | "
                         f"{_fmt(a['ttft_ms_p50'])} | {_fmt(a['ttft_ms_p95'])} | {_fmt(a['requests_per_s'], 2)} | "
                         f"{_fmt(a['output_tokens_per_s'])} | {_fmt(a['mean_output_tokens'])} |")
    lines += ["", "## Student / teacher", "",
              "| concurrency | latency p50 ratio | output tokens/s ratio |", "|---|---|---|"]
    for lv in result["levels"]:
        lines.append(f"| {lv['concurrency']} | {_fmt(lv['latency_ratio'], 2)} | {_fmt(lv['throughput_ratio'], 2)} |")
    lines += ["", f"The JSON line's `latency_ratio` and `throughput_ratio` are those at the highest level "
              f"(concurrency {result['ratio_level']}).", "", "## What Serve adds", ""]
    if o["overhead"] is None:
        lines.append(f"Not measured: {o['error']}.")
    else:
        lines += [f"**overhead = {o['overhead']:.3f}** (served p50 / in-process p50; target ≤ 1.05; served − in-process "
                  f"p50 = {o['added_ms_p50']:+.1f} ms per request): the student "
                  f"`{o['model']}` one request at a time, {o['requests']} requests each, alternating; in-process "
                  f"`vllm.LLM` ({', '.join(f'{k}={v}' for k, v in o['engine_kwargs'].items())}, started in "
                  f"{o['startup_s']} s) vs the served `student` (streaming).", "",
                  "| | latency p50 (ms) | p95 (ms) | mean output tokens | errors |", "|---|---|---|---|---|",
                  *(f"| {k} | {_fmt(o[k]['latency_ms_p50'])} | {_fmt(o[k]['latency_ms_p95'])} | "
                    f"{_fmt(o[k]['mean_output_tokens'])} | {o[k]['errors']} |" for k in ("inprocess", "served")),
                  "", f"Same answer text in both: {_fmt(100 * o['same_text_share'] if o['same_text_share'] is not None else None, 0)} % of prompts."]
    errors = [(lv["concurrency"], arm, a) for lv in result["levels"] for arm, a in lv["arms"].items() if a["errors"]]
    if errors:
        lines += ["", "## Errors", ""]
        lines += [f"- concurrency {c}, {arm}: {a['errors']} of {a['requests']} failed, first: {a['first_error']}"
                  for c, arm, a in errors]
    if "plot" in result.get("files", {}):
        lines += ["", "![latency and throughput vs concurrency](serve.png)"]
    return "\n".join(lines) + "\n"


def write_plot(result: dict, path: Path) -> None:
    """serve.png: latency p50 (solid) and p95 (dashed) and output tokens/s against concurrency, both arms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"teacher": "tab:blue", "student": "tab:orange"}
    levels = [lv["concurrency"] for lv in result["levels"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for arm in ARMS:
        figs = [lv["arms"][arm] for lv in result["levels"]]

        def series(key):
            return [f[key] if f[key] is not None else float("nan") for f in figs]

        ax1.plot(levels, series("latency_ms_p50"), "o-", color=colors[arm], label=f"{arm} p50")
        ax1.plot(levels, series("latency_ms_p95"), "o--", color=colors[arm], alpha=0.6, label=f"{arm} p95")
        ax2.plot(levels, series("output_tokens_per_s"), "o-", color=colors[arm], label=arm)
    for ax, label, title in ((ax1, "latency per request (ms)", "Latency"),
                             (ax2, "output tokens/s", "Throughput")):
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.set_title(title)
        ax.set_xticks(levels)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
