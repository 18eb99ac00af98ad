"""Generation benchmark (issue 6): `raydistill generate` against vLLM's offline engine, and the
driver's memory as the prompt count grows.

    .venv/bin/python benchmarks/generate_throughput.py [--prompts 200] [--rounds 1] [--quick]

1. **Throughput.** The embedded teacher (``embedded:SmolLM2-135M-Instruct``), the same prompts
   and the same sampling (greedy, ``--max-new-tokens`` 64, max_model_len 1024, float32,
   enforce_eager, 2 GiB KV cache) through

   a. ``raydistill generate`` (engine vllm) in a subprocess: output tokens/s =
      ``response_tokens / generate_s``, with the answering job's times read from the command's
      log (``answer_job_times``): ``startup_s`` from the job's start to the vLLM engine's
      "init engine" line (Ray Data pipeline + engine start-up), ``generate_s`` from there to the
      job's end (last shard written);
   b. ``vllm.LLM(...).generate(...)`` in one subprocess (the vLLM CPU settings of
      ``raydistill.runtime.vllm_env``), fed the prompt rows raydistill wrote to
      ``corpus/prompts/`` as ``TokensPrompt``s of ``raydistill.chat.prompt_ids``: output tokens /
      ``generate()`` seconds; ``LLM()`` construction is timed apart.

   ``ratio`` = raydistill / vLLM tokens/s (target ≥ 0.95), the median over ``--rounds`` rounds
   (each round runs raydistill then vLLM, back to back, so machine load hits both alike); the
   spread is reported. ``same_tokens_share`` = share of prompts whose greedy
   answer token ids are identical in both (a check that both did the same work).
2. **Driver memory.** Peak RSS of the ``raydistill generate`` process (psutil, every 50 ms; the
   driver alone, not Ray's workers) for ``--mem-prompts`` (2,000 and 20,000) prompts on a tiny
   random Llama (``tests/conftest.py:build_tiny_model``), engine ``--mem-engine`` (hf: no engine
   start-up), ``--mem-max-new-tokens`` 2. ``driver_rss_ratio`` = peak at the larger count / peak
   at the smaller (target ≤ 1.2).

The last line printed is one JSON object: ``ratio``, ``driver_rss_ratio`` and the raw figures.
Everything is written under ``--workdir`` (default: a new temporary folder, removed at the end
unless ``--keep``); nothing goes into the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO_PROMPTS = REPO / "raydistill" / "demo" / "prompts.jsonl"
TEACHER = "embedded:SmolLM2-135M-Instruct"

# One place for the settings both sides of the throughput comparison share.
MAX_MODEL_LEN = 1024
KV_CACHE_GIB = 2
DTYPE = "float32"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- inputs

def write_prompts(path: Path, n: int) -> Path:
    """``n`` prompt rows (id, task, prompt, reference): the demo prompts in order, repeated with a
    varied text ("(variant k)") and a distinct id from the second pass on."""
    base = [json.loads(line) for line in DEMO_PROMPTS.read_text().splitlines() if line.strip()]
    with path.open("w") as f:
        for i in range(n):
            row = dict(base[i % len(base)])
            k = i // len(base)
            if k:
                row["id"] = f"{row['id']}-v{k}"
                row["prompt"] = f"{row['prompt']} (variant {k})"
            f.write(json.dumps(row) + "\n")
    return path


def write_config(path: Path, output_dir: Path, prompts: Path, teacher: str, engine: str, max_new_tokens: int,
                 batch_size: int) -> Path:
    """A run config: every prompt answered (no test split), the demo's engine settings made explicit."""
    import yaml

    cfg = {
        "output_dir": str(output_dir),
        "data": {"path": str(prompts), "prompt_field": "prompt", "reference_field": "reference", "id_field": "id",
                 "task_field": "task", "split": {"validation": 0.0, "test": 0.0}},
        "teacher": {"model": teacher, "engine": engine, "batch_size": batch_size, "replicas": 1,
                    "max_model_len": MAX_MODEL_LEN, "dtype": DTYPE, "kv_cache_gib": KV_CACHE_GIB},
        "generation": {"max_new_tokens": max_new_tokens, "temperature": 0.0, "top_p": 1.0, "seed": 0},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


_TMP: list[Path] = []  # the runs' temp folder, made once per benchmark


def child_env(work: Path) -> dict[str, str]:
    """Environment of every subprocess: caches under ``work``, temp files (Ray's session folder,
    vLLM's sockets) in a short folder under /tmp (Ray's socket paths must stay under 108
    characters), Ray local and quiet."""
    if not _TMP:
        _TMP.append(Path(tempfile.mkdtemp(prefix="rdb-", dir="/tmp")))
    tmp = _TMP[0]
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # always a private local Ray
    env.update({"TMPDIR": str(tmp), "VLLM_CACHE_ROOT": str(work / "vllm-cache"), "HF_HUB_OFFLINE": "1",
                "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))})
    return env


# ----------------------------------------------------------------------------- raydistill runs

def run_raydistill(config: Path, work: Path, log_name: str, poll_rss: bool = False) -> dict:
    """``raydistill generate CONFIG --overwrite`` in a subprocess; returns the manifest's figures,
    the process wall time and (``poll_rss``) the driver's peak RSS in MiB. Raises RuntimeError
    with the log's tail when the command fails."""
    import psutil

    logfile = work / f"{log_name}.log"
    cmd = [sys.executable, "-m", "raydistill.cli", "generate", str(config), "--overwrite"]
    t0 = time.perf_counter()
    with logfile.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env(work), cwd=work)
        peak = 0
        if poll_rss:
            ps = psutil.Process(proc.pid)
            while proc.poll() is None:
                try:
                    peak = max(peak, ps.memory_info().rss)
                except psutil.Error:
                    break
                time.sleep(0.05)
        rc = proc.wait()
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"`{' '.join(cmd)}` exited {rc} (log {logfile}):\n{tail}")
    import yaml

    output_dir = Path(yaml.safe_load(config.read_text())["output_dir"])
    manifest = json.loads((output_dir / "corpus" / "manifest.json").read_text())
    out = {"rows": manifest["rows_generated"], "response_tokens": manifest["response_tokens"],
           "seconds": manifest["seconds"], "process_wall_s": round(wall, 2)}
    if poll_rss:
        out["peak_rss_mib"] = round(peak / 2**20, 1)
    return out


def raydistill_answers(output_dir: Path) -> dict[str, list[int]]:
    """prompt_id -> response token ids of every answer (kept and rejected rows)."""
    import pyarrow.parquet as pq

    answers = {}
    for sub in ("data", "rejects"):
        for f in sorted((output_dir / "corpus" / sub).glob("*.parquet")):
            t = pq.read_table(f, columns=["prompt_id", "response_token_ids"])
            answers.update(zip(t.column("prompt_id").to_pylist(), t.column("response_token_ids").to_pylist()))
    return answers


# ----------------------------------------------------------------------------- vLLM offline

def vllm_worker(prompts_dir: str, out_json: str, max_new_tokens: int) -> None:
    """(Runs in a subprocess.) vLLM's offline ``LLM.generate`` over the prompt rows raydistill
    wrote (``corpus/prompts/``, test split left out), as token-id prompts of ``chat.prompt_ids``.
    Writes ``{"import_s", "startup_s" (``LLM()`` construction), "generate_s", "rows",
    "response_tokens", "answers"}`` to ``out_json`` (seconds; answers: prompt_id -> token ids)."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from raydistill.chat import prompt_ids
    from raydistill.models import resolve_model

    model_dir = resolve_model(TEACHER)
    rows = []
    for f in sorted(Path(prompts_dir).glob("*.parquet")):
        rows += [r for r in pq.read_table(f, columns=["prompt_id", "split", "messages"]).to_pylist()
                 if r["split"] != "test"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = [prompt_ids(tok, [{"role": m["role"], "content": m["content"]} for m in r["messages"]]) for r in rows]

    t0 = time.perf_counter()
    import vllm
    from vllm.inputs import TokensPrompt

    import_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    llm = vllm.LLM(model=model_dir, dtype=DTYPE, max_model_len=MAX_MODEL_LEN, enforce_eager=True,
                   tensor_parallel_size=1, max_logprobs=20, seed=0)
    startup = time.perf_counter() - t0
    params = vllm.SamplingParams(max_tokens=max_new_tokens, temperature=0.0, top_p=1.0, seed=0)
    t0 = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=x) for x in ids], params, use_tqdm=False)
    gen_s = time.perf_counter() - t0
    answers = {r["prompt_id"]: list(o.outputs[0].token_ids) for r, o in zip(rows, outputs)}
    Path(out_json).write_text(json.dumps({
        "import_s": round(import_s, 2), "startup_s": round(startup, 2), "generate_s": round(gen_s, 2), "rows": len(rows),
        "response_tokens": sum(len(a) for a in answers.values()), "answers": answers}))


def run_vllm(prompts_dir: Path, work: Path, log_name: str, max_new_tokens: int) -> dict:
    from raydistill.runtime import vllm_env

    out_json = work / f"{log_name}.json"
    logfile = work / f"{log_name}.log"
    env = dict(child_env(work), **vllm_env(KV_CACHE_GIB, here=True))
    cmd = [sys.executable, str(Path(__file__).resolve()), "_vllm_worker", str(prompts_dir), str(out_json),
           str(max_new_tokens)]
    t0 = time.perf_counter()
    with logfile.open("w") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=work).returncode
    if rc != 0:
        tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"vLLM offline run exited {rc} (log {logfile}):\n{tail}")
    res = json.loads(out_json.read_text())
    res["process_wall_s"] = round(time.perf_counter() - t0, 2)
    return res


# ----------------------------------------------------------------------------- the two figures

def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4), "values": [round(v, 4) for v in values]}


def throughput(args, work: Path) -> dict:
    from raydistill.models import resolve_model

    resolve_model(TEACHER)  # converts the embedded GGUF once (cached), outside every timed run
    prompts = write_prompts(work / f"prompts-{args.prompts}.jsonl", args.prompts)
    rounds = []
    for r in range(args.rounds):
        log(f"round {r + 1}/{args.rounds}: raydistill generate ({args.prompts} prompts, {args.max_new_tokens} new tokens)")
        out_dir = work / f"rd-{r}"
        cfg = write_config(work / f"rd-{r}.yaml", out_dir, prompts, TEACHER, "vllm", args.max_new_tokens,
                           args.batch_size)
        ours = run_raydistill(cfg, work, f"rd-{r}")
        ours.update(answer_job_times(work / f"rd-{r}.log"))
        ours["tokens_per_s"] = round(ours["response_tokens"] / ours["generate_s"], 2)
        log(f"  raydistill: {ours}")
        log(f"round {r + 1}: vLLM offline LLM.generate on the same prompt rows")
        vl = run_vllm(out_dir / "corpus" / "prompts", work, f"vllm-{r}", args.max_new_tokens)
        answers = vl.pop("answers")
        vl["tokens_per_s"] = round(vl["response_tokens"] / vl["generate_s"], 2)
        log(f"  vLLM: {vl}")
        theirs = raydistill_answers(out_dir)
        same = sum(1 for pid, a in answers.items() if theirs.get(pid) == a)
        if vl["rows"] != ours["rows"]:
            log(f"  warning: vLLM answered {vl['rows']} prompts, raydistill {ours['rows']}")
        ratio = ours["tokens_per_s"] / vl["tokens_per_s"]
        rounds.append({"raydistill": ours, "vllm": vl, "ratio": round(ratio, 4),
                       "same_tokens_share": round(same / max(1, len(answers)), 4),
                       "load_avg": [round(x, 2) for x in os.getloadavg()]})
        log(f"  ratio raydistill/vLLM = {ratio:.3f}; identical answers {same}/{len(answers)}")
    return {"rounds": rounds, "ratio": spread([x["ratio"] for x in rounds]),
            "raydistill_tokens_per_s": spread([x["raydistill"]["tokens_per_s"] for x in rounds]),
            "vllm_tokens_per_s": spread([x["vllm"]["tokens_per_s"] for x in rounds]),
            "raydistill_startup_s": spread([x["raydistill"]["startup_s"] for x in rounds]),
            "vllm_startup_s": spread([x["vllm"]["startup_s"] for x in rounds])}


_RAY_TS = re.compile(r"^(\d{4})-(\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})\s+INFO streaming_executor")
_VLLM_READY = re.compile(r"INFO (\d\d-\d\d \d\d:\d\d:\d\d) \[[^\]]*\] init engine \(profile, create kv cache")


def answer_job_times(logfile: Path) -> dict:
    """Start-up and generation time of the answering job, read from a ``raydistill generate`` log.

    The job is the Ray Data dataset started right after raydistill's "answering up to" line:
    ``startup_s`` = its start ("Starting execution of Dataset D", ms) to the first vLLM engine's
    "init engine (profile, create kv cache, warmup model)" line (engine ready; vLLM logs whole
    seconds); ``generate_s`` = engine ready to "Dataset D execution finished" (the last shard
    written); ``job_s`` = the whole job. Raises RuntimeError naming the line it could not find.
    """
    from datetime import datetime

    lines = logfile.read_text(errors="replace").splitlines()
    try:
        i = next(i for i, line in enumerate(lines) if "generate: answering up to" in line)
    except StopIteration:
        raise RuntimeError(f"{logfile}: no 'generate: answering up to' line") from None

    def ray_time(line: str) -> tuple[datetime, str]:
        m = _RAY_TS.match(line)
        return datetime.strptime(f"{m.group(1)}-{m.group(2)}.{m.group(3)}", "%Y-%m-%d %H:%M:%S.%f"), m.group(1)

    start = end = ready = None
    dataset = year = None
    for line in lines[i:]:
        if dataset is None and "Starting execution of Dataset " in line and _RAY_TS.match(line):
            dataset = line.split("Starting execution of Dataset ", 1)[1].split(".", 1)[0].strip()
            start, year = ray_time(line)
        elif dataset and ready is None and (m := _VLLM_READY.search(line)):
            ready = datetime.strptime(f"{year}-{m.group(1)}", "%Y-%m-%d %H:%M:%S")
        elif dataset and f"Dataset {dataset} execution finished" in line and _RAY_TS.match(line):
            end = ray_time(line)[0]
            break
    missing = [name for name, v in (("'Starting execution of Dataset' after it", start),
                                    ("vLLM's 'init engine (profile, ...)' line", ready),
                                    (f"'Dataset {dataset} execution finished'", end)) if v is None]
    if missing:
        raise RuntimeError(f"{logfile}: no {', '.join(missing)} after the 'answering up to' line")
    return {"startup_s": round((ready - start).total_seconds(), 2),
            "generate_s": round((end - ready).total_seconds(), 2),
            "job_s": round((end - start).total_seconds(), 2)}


def driver_memory(args, work: Path) -> dict:
    sys.path.insert(0, str(REPO))
    from tests.conftest import build_tiny_model

    model = build_tiny_model(work / "tiny-model")
    runs = {}
    for n in args.mem_prompts:
        prompts = write_prompts(work / f"mem-prompts-{n}.jsonl", n)
        cfg = write_config(work / f"mem-{n}.yaml", work / f"mem-{n}", prompts, str(model), args.mem_engine,
                           args.mem_max_new_tokens, args.mem_batch_size)
        log(f"driver memory: {n} prompts, tiny model, engine {args.mem_engine}")
        runs[n] = run_raydistill(cfg, work, f"mem-{n}", poll_rss=True)
        log(f"  {runs[n]}")
    lo, hi = min(args.mem_prompts), max(args.mem_prompts)
    return {"runs": {str(k): v for k, v in runs.items()},
            "driver_rss_ratio": round(runs[hi]["peak_rss_mib"] / runs[lo]["peak_rss_mib"], 4)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=200, help="prompts of the throughput comparison (default 200)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per answer, greedy (default 64)")
    p.add_argument("--batch-size", type=int, default=64, help="teacher.batch_size of raydistill (default 64, the demo's)")
    p.add_argument("--rounds", type=int, default=1, help="throughput rounds (median and spread reported)")
    p.add_argument("--mem-prompts", type=lambda s: [int(x) for x in s.split(",")], default=[2000, 20000],
                   help="prompt counts of the driver-memory runs (default 2000,20000)")
    p.add_argument("--mem-engine", choices=["hf", "vllm"], default="hf", help="engine of the memory runs (default hf)")
    p.add_argument("--mem-max-new-tokens", type=int, default=2, help="tokens per answer in the memory runs (default 2)")
    p.add_argument("--mem-batch-size", type=int, default=256, help="teacher.batch_size of the memory runs (default 256)")
    p.add_argument("--only", choices=["throughput", "memory"], help="run one of the two parts")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 6 prompts × 8 tokens, memory at 100 vs 400 prompts")
    p.add_argument("--workdir", type=Path, help="where runs, logs and caches go (default: a new temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (default: removed at the end)")
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.max_new_tokens, args.batch_size = 6, 8, 4
        args.mem_prompts = [100, 400]
    if len(set(args.mem_prompts)) < 2:
        p.error("--mem-prompts needs two different counts, e.g. 2000,20000")
    # Short default path: Ray's socket paths must stay under 108 characters.
    work = args.workdir or Path(tempfile.mkdtemp(prefix="rdbench-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    work = work.resolve()
    log(f"work folder {work}")
    result: dict = {"ratio": None, "driver_rss_ratio": None,
                    "settings": {k: v for k, v in vars(args).items() if k not in ("workdir", "keep", "only")},
                    "load_avg_start": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count()}
    try:
        if args.only in (None, "throughput"):
            tp = throughput(args, work)
            result["ratio"] = tp["ratio"]["median"]
            result["throughput"] = tp
        if args.only in (None, "memory"):
            mem = driver_memory(args, work)
            result["driver_rss_ratio"] = mem["driver_rss_ratio"]
            result["memory"] = mem
    finally:
        result["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
        if args.keep or args.workdir:
            log(f"outputs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
        for tmp in _TMP:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_vllm_worker":
        sys.path.insert(0, str(REPO))
        vllm_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        sys.path.insert(0, str(REPO))
        main()
