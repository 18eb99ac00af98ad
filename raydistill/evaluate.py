"""The evaluate stage: teacher, baseline student and distilled student on held-out prompts.

Prompts: the ``eval.split`` rows of ``corpus/prompts/``, the split written once by generate
(``raydistill.corpus.read_prompts``: only that split's rows are read, the filter pushed into the
parquet scan; the overlap checks stream ids and messages, so the driver never holds the train
set), never ``data.path`` re-read with today's ``data.*``: a changed ``data.seed`` (or id field,
path, template) would otherwise put training prompts into the test set.
Evaluate fails when an evaluated prompt's id or messages (normalized, see ``check_unseen``) are a train
row's of the corpus, naming counts and example ids, and logs (and warns in the report) when the
current ``data.*`` settings differ from those in ``corpus/config.yaml``.
``eval.limit`` keeps a seeded sample spread over the task types (``data.sample_by_task`` with
``data.seed``), not the first rows.

Timing in rounds: the prompts are cut into ``eval.rounds`` parts of whole engine batches
(``split_rounds``: an interleaved order, so each part mixes the tasks). Each model starts one engine
for the whole evaluation and answers every round in it, round after round (``answer_rounds``; a batch
never holds two rounds), then the next model: ``eval.rounds`` no longer multiplies engine loads (hours
for a 405B teacher). Each round gives its own student/teacher ratios, and their spread shows load
that changed while timing. Every model answers through ``generate.answer_dataset`` with engine
``eval.engine`` under the same load (``timed_engines``): every model at ``eval.batch_size`` and
``eval.replicas``, one batch in flight per replica; the teacher keeps what its model needs (tensor and
pipeline parallelism, GPUs per replica, dtype, max length), and throughput is also given per GPU; an API teacher (``teacher.engine: openai``) answers from its endpoint
through the same ``openai`` engine as at generation, and has no memory probe (null figures, noted).
Engine start (vLLM: 10 s to hours by model size) is not in any latency: latency is per request. The answers of all rounds together give the quality figures.

``eval.latency_source: serve``: the answers, and so every quality figure, come from the engines as
above, but the latency and throughput figures of the teacher and the student come from the running
``raydistill serve`` endpoint (``serve.host``:``serve.port``, models ``teacher`` and ``student``):
after the engine rounds, in the same rounds, each round's prompts are sent to the served teacher and
then the served student (the order alternates by round), one request at a time (concurrency 1),
streaming, through the benchmark's client (``raydistill.serve.bench.run_requests``; one warm-up request
per arm not counted), with ``generation.*`` sampling (max_new_tokens, temperature, top_p, seed). The
endpoint is checked before any engine starts (``EndpointError`` when nothing answers). The baseline
student is not served: its timing figures are null (n/a) and so are its timing ratios. Every served
request is kept in ``eval/served.parquet`` (model, round, prompt_id, latency_s, ttft_s, response_tokens
from the stream's usage, batch_id, answered_by, error); a served request that fails is left out of
the timing figures and counted in a warning. ``output_tokens_per_s`` is then output tokens / the sum
of the requests' latencies (one at a time, so that is the time the endpoint spent).

Written under ``output_dir/eval/``: ``answers.parquet`` (every answer: the generation columns of
``schema.GENERATED_SCHEMA`` + ``model`` + ``round``), ``report.json``, ``report.md``,
``quality_vs_latency.png``, ``agreement.png``. ``answers.parquet`` is written first, into
``eval.partial/``: if anything fails after the answers exist, that folder is kept (the log names
it); the report is otherwise always written, with ``null`` (n/a in report.md) for every figure that
cannot be computed (e.g. a model that answered no prompt), and the plots skip those points.
``report.json`` is strict JSON (no NaN).

An ``s3://`` ``output_dir`` works the same way: the prompts, the corpus manifest and config are read
from S3; the report's ``path`` of the student (and the pruned baseline) keeps its S3 URI; ``eval/``
is built in a local temporary folder. ``answers.parquet`` is uploaded to ``output_dir/eval.partial/``
as soon as it exists (kept there on a failure). Once the report is complete locally, the whole
folder goes to ``eval.partial/`` and then replaces ``output_dir/eval/``, ``report.json`` uploaded
last each time: an ``eval/`` without ``report.json`` is unfinished, and a failure while it is
rewritten leaves the complete new evaluation in ``eval.partial/`` (and the local folder, logged).
The students go to the engines as their ``s3://`` URIs (each replica fetches them on its own
node); the driver copies only their config and tokenizer files (``storage.local_copy(...,
weights=False)``), takes their size from the S3 listing, and probes their memory in a Ray task that
fetches them on its own node (``_probe``).

``report.json``, top level:
- ``split``, ``prompts`` (evaluated), ``prompts_by_task``, ``limit`` (``eval.limit``),
  ``prompt_source`` (the prompts/ folder read);
- ``data_changed_since_corpus``: ``data.<key>`` → ``{"corpus": …, "now": …}`` for every data setting
  that differs from ``corpus/config.yaml`` (the corpus's split was used regardless);
- ``teacher``, ``engine`` (``eval.engine``: the engine that produced the answers, and latency and tokens/s
  unless ``timing_source`` says otherwise);
- ``timing_source``: where latency and throughput come from: ``{latency_source: "engine" | "serve",
  models: {name: "engine" | "serve" | null}, endpoint, concurrency}`` (endpoint and concurrency null for
  engine; null for a model without timing figures);
- ``memory_probe``: how memory was measured: ``engine`` (always ``transformers``: one batch of
  ``batch`` prompts, ``max_new_tokens`` 32, in a fresh process, see ``raydistill._probe``), and
  per model the ``dtype`` and ``device`` used (the dtype of that model's evaluation engine);
- ``warnings``: list of sentences, also at the top of report.md: a model that answered no
  prompt or failed some; degenerate output; retained quality below ``eval.warn_retained_below``;
  unscorable references; a timing ratio whose spread over rounds exceeds ``eval.max_ratio_spread``;
  a student that hits the token limit far more often than the teacher; data settings changed since
  the corpus; a failed memory probe or plot;
- ``thresholds``: ``max_ratio_spread``, ``warn_retained_below``, ``repeat_coverage``,
  ``degenerate_share`` (the values the warnings used);
- ``timing``: ``rounds`` (number of rounds run), ``per_round``: list of ``{round, prompts,
  models: {name: {latency_ms_p50, output_tokens_per_s, answers}}}``, ``settings``: per model the timed
  engine's ``engine``, ``batch_size``, ``replicas``, ``concurrency`` (batches in flight) and ``gpus``
  (``timed_engines``: every model runs at ``eval.batch_size`` and ``eval.replicas`` with one batch in
  flight per replica, so latency and tokens/s ratios compare the same load; report.md states these
  next to each ratio);
- ``compared_to_teacher``: per student (``baseline_student``, ``student``): ``params``,
  ``size_mb_eval_dtype`` and ``model_memory_mb`` ratios (student / teacher, null when either is
  missing), and ``latency_ms_p50`` and ``output_tokens_per_s`` ratio summaries over rounds, each
  ``{median, min, max, spread, per_round, trusted}``: ``per_round`` the ratio in each round (null
  where either model answered nothing that round), ``median`` / ``min`` / ``max`` over the rounds
  that have one, ``spread`` = (max − min) / median (null with fewer than two rounds), ``trusted`` =
  spread ≤ ``eval.max_ratio_spread`` (null when the spread is unknown); ``output_tokens_per_s_per_gpu``:
  the same summary of the per-GPU ratio (null on CPU or for an API teacher);
- ``retained`` (and ``retained_baseline``): student metric / teacher metric for each
  ``task.metric`` and ``quality``; null where the teacher scored 0 or either is missing; math
  uses strict ``accuracy`` (a stated final answer only), ``accuracy_lenient`` is not in it;
- ``corpus_rejects``: the teacher corpus's filtering, from ``corpus/manifest.json``:
  ``{rows_kept, rows_rejected, rejects: {reason: count}}`` (reasons of
  ``raydistill.generate.filters.REASONS``; the rows themselves are in ``corpus/rejects/``); null
  for a corpus whose manifest records none;
- ``provenance``: package versions.

``report.json`` → ``models.<name>`` (teacher, baseline_student, student):
- ``metrics``: task → metric → value (see ``raydistill.tasks``), over the answered prompts; math has
  ``accuracy`` (strict: only a stated final answer, or an answer that is one number alone, counts;
  the primary metric) beside ``accuracy_lenient`` (also the last number of an answer stating none);
- ``unscorable``: task → number of answered prompts whose reference the scorer could not read
  (an NLI label it does not know, a math reference without a number; ``data.label_map`` maps
  labels), left out of that task's metrics;
- ``quality``: mean of each task's primary metric (accuracy or ROUGE-L), 0–1; null without references;
- ``agreement_rougeL``: mean ROUGE-L F1 of the answer against the teacher's answer, 0–1, over
  prompts both answered;
- ``answers`` / ``errors``: prompts answered / failed (e.g. longer than the engine's max length);
  failed prompts are left out of every other figure;
- ``finish_stop_share`` / ``finish_length_share``: share of answers that ended by themselves
  (finish reason ``stop``) / that hit the token limit (``length``), 0–1;
- ``mean_output_tokens``: mean answer length (tokens);
- ``latency_ms_p50`` / ``latency_ms_p95``: per-answer latency (request sent → last token), ms (from
  the endpoint for the served models when ``timing_source.latency_source`` is ``serve``);
- ``latency_ms_per_token_p50``: median over answers of latency / answer tokens (ms/token); with the
  hf engine a batch's answers return together, so a short answer carries its batch's time;
- ``output_tokens_per_s``: generated tokens / engine time, the sum over engine batches (run one
  at a time) of the batch's slowest answer (engine start-up excluded); ``output_tokens_per_s_per_gpu``:
  that / the GPUs the engine holds (``timing.settings``; null on CPU or for an API endpoint);
- ``repetitive_share``: share of answers whose most repeated n-gram (n ≤ 4 tokens, at least 3
  occurrences) covers more than ``repeat_coverage`` (0.5) of the answer's tokens;
  ``max_repeat_run``: the longest run of one n-gram repeated back to back in any answer (repeats);
  ``identical_share``: share of answers (NLI excluded: its answers are labels) whose text is the
  answer to another prompt too; ``degenerate``: either share above ``degenerate_share`` (0.3);
- ``params``: parameter count; ``dtype``: the evaluation engine's dtype;
- ``model_memory_mb``: the model's own memory, weights + activations/KV cache at the probe batch
  (peak − baseline on CPU; peak CUDA memory allocated on GPU); ``process_baseline_mb``: the
  probe process with torch and transformers imported, before the model; ``peak_memory_mb``: the
  probe process's peak (baseline + model); all MB = 10^6 bytes, measured with transformers in
  ``dtype``, null if the probe failed;
- ``size_mb``: weight files as stored (MB), ``size_dtype``: their dtype (from config.json), both
  null when the model is a hub id not in the local cache; ``size_mb_eval_dtype``: params × bytes per
  parameter of ``dtype`` (4 for float32, 2 for bfloat16/float16), the size compared across models;
- ``path``: the model folder (or hub id) evaluated.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa

from .config import Config, EngineConfig
from .generate import engine_throughput
from .tasks import PRIMARY, rouge_l, score

log = logging.getLogger(__name__)

MODEL_NAMES = ("teacher", "baseline_student", "student")
STUDENTS = ("baseline_student", "student")
#: An answer is repetitive when its most repeated n-gram covers more than this share of its tokens.
REPEAT_COVERAGE = 0.5
#: A model is flagged degenerate when more than this share of its answers is repetitive, or is
#: the same text as the answer to another prompt.
DEGENERATE_SHARE = 0.3
#: Tasks whose answers are labels: identical answers across prompts are expected there.
LABEL_TASKS = ("nli",)
#: Metrics with this suffix (``math.accuracy_lenient``) are shown but not used for ``retained``.
LENIENT_SUFFIX = "_lenient"
BYTES_PER_PARAM = {"float32": 4, "bfloat16": 2, "float16": 2}
_MAX_NGRAM = 4


# ----------------------------------------------------------------------------- small arithmetic

def _percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0–100), as numpy's default; None for no values."""
    import numpy as np

    return float(np.percentile(values, q)) if values else None


def _ratio(a, b) -> float | None:
    """a / b, or None when either is missing or b is 0."""
    if a is None or b is None or not b:
        return None
    return a / b


# ----------------------------------------------------------------------------- answer figures

def repetition(tokens: list) -> tuple[float, int]:
    """How repetitive one answer is: (coverage, max_run).

    ``coverage``: the largest share of the tokens covered by the occurrences of one n-gram (for
    each n = 1..4 its most frequent n-gram, if it occurs at least 3 times); 0.0 when none does.
    ``max_run``: the most times one n-gram repeats back to back (1 = no repeat; 0 for an empty answer).
    """
    n_tok = len(tokens)
    if n_tok == 0:
        return 0.0, 0
    coverage, max_run = 0.0, 1
    for n in range(1, _MAX_NGRAM + 1):
        if n_tok < n:
            break
        counts: dict[tuple, int] = {}
        for i in range(n_tok - n + 1):
            key = tuple(tokens[i:i + n])
            counts[key] = counts.get(key, 0) + 1
        key, top = max(counts.items(), key=lambda kv: kv[1])
        if top >= 3:
            covered = set()
            for i in range(n_tok - n + 1):
                if tuple(tokens[i:i + n]) == key:
                    covered.update(range(i, i + n))
            coverage = max(coverage, len(covered) / n_tok)
        streak = 0  # positions i with tokens[i] == tokens[i - n], consecutively
        for i in range(n, n_tok):
            streak = streak + 1 if tokens[i] == tokens[i - n] else 0
            max_run = max(max_run, streak // n + 1)
    return coverage, max_run


def degeneracy(rows: list[dict]) -> dict:
    """Degenerate-output figures of one model's answered rows (see module docstring).

    Tokens are the row's ``response_token_ids`` (whitespace words when the engine gave none).
    Returns ``repetitive_share``, ``max_repeat_run``, ``identical_share`` (None without rows) and
    ``degenerate`` (bool).
    """
    if not rows:
        return {"repetitive_share": None, "max_repeat_run": None, "identical_share": None, "degenerate": False}
    reps = [repetition(list(r.get("response_token_ids") or []) or (r["response"] or "").split()) for r in rows]
    repetitive = sum(cov > REPEAT_COVERAGE for cov, _ in reps) / len(rows)
    texts = [" ".join((r["response"] or "").split()).lower() for r in rows if r["task"] not in LABEL_TASKS]
    seen: dict[str, int] = {}
    for t in texts:
        seen[t] = seen.get(t, 0) + 1
    identical = sum(seen[t] > 1 for t in texts) / len(texts) if texts else None
    return {"repetitive_share": repetitive, "max_repeat_run": max(run for _, run in reps),
            "identical_share": identical,
            "degenerate": repetitive > DEGENERATE_SHARE or (identical or 0.0) > DEGENERATE_SHARE}


def _score(task: str, preds: list[str], refs: list, label_map: dict | None,
           marker: str = "####") -> tuple[dict, int]:
    """``tasks.score`` → (metrics, unscorable reference count)."""
    return score(task, preds, refs, label_map=label_map, marker=marker)


def model_report(table: pa.Table, teacher: pa.Table, label_map: dict[str, str] | None = None,
                 marker: str = "####") -> dict:
    """Quality, agreement, ending, degeneracy and latency figures of one model's answers.

    ``table`` and ``teacher``: answers (``GENERATED_SCHEMA`` columns) to the same prompts in the
    same order. Rows that failed (``error`` set) are counted in ``errors`` and left out of every
    other figure; agreement uses the rows that both this model and the teacher answered. Figures
    that need an answered row are None when there is none (see module docstring for each key).
    """
    rows = table.to_pylist()
    ok = [r for r in rows if r["error"] is None]
    by_task: dict[str, tuple[list[str], list]] = {}
    for r in ok:
        preds, refs = by_task.setdefault(r["task"], ([], []))
        preds.append(r["response"])
        refs.append(r["reference"])
    metrics: dict[str, dict] = {}
    unscorable: dict[str, int] = {}
    for task, (p, refs) in sorted(by_task.items()):
        ms, bad = _score(task, p, refs, label_map, marker)
        if ms:
            metrics[task] = ms
        if bad:
            unscorable[task] = bad
    primary = [m[PRIMARY[t]] for t, m in metrics.items() if PRIMARY.get(t) in m]
    lat_ms = [r["latency_s"] * 1000 for r in ok if r["latency_s"] is not None]
    per_token = [r["latency_s"] * 1000 / r["response_tokens"] for r in ok
                 if r["latency_s"] is not None and r["response_tokens"]]
    both = [(r["response"], t["response"]) for r, t in zip(rows, teacher.to_pylist(), strict=True)
            if r["error"] is None and t["error"] is None]
    n_ok = len(ok)
    return {
        "metrics": metrics,
        "unscorable": unscorable,
        "quality": sum(primary) / len(primary) if primary else None,
        "agreement_rougeL": rouge_l([a for a, _ in both], [b for _, b in both]) if both else None,
        "answers": n_ok,
        "errors": len(rows) - n_ok,
        "finish_stop_share": sum(r["finish_reason"] == "stop" for r in ok) / n_ok if n_ok else None,
        "finish_length_share": sum(r["finish_reason"] == "length" for r in ok) / n_ok if n_ok else None,
        "mean_output_tokens": sum(r["response_tokens"] or 0 for r in ok) / n_ok if n_ok else None,
        "latency_ms_p50": _percentile(lat_ms, 50),
        "latency_ms_p95": _percentile(lat_ms, 95),
        "latency_ms_per_token_p50": _percentile(per_token, 50),
        "output_tokens_per_s": engine_throughput(table) if lat_ms else None,
        **degeneracy(ok),
    }


def retained(student: dict, teacher: dict) -> dict[str, float | None]:
    """student / teacher per ``task.metric`` and for ``quality``; None where the teacher is 0 or
    either value is missing. Lenient figures (``math.accuracy_lenient``) are left out: retention is
    measured on strict accuracy only."""
    out: dict[str, float | None] = {}
    for task, ms in teacher["metrics"].items():
        for metric, t_val in ms.items():
            if metric.endswith(LENIENT_SUFFIX):
                continue
            out[f"{task}.{metric}"] = _ratio(student["metrics"].get(task, {}).get(metric), t_val)
    out["quality"] = _ratio(student["quality"], teacher["quality"])
    return out


# ----------------------------------------------------------------------------- rounds

def split_rounds(prompts: pa.Table, rounds: int, batch_size: int | None = None) -> list[pa.Table]:
    """Cut ``prompts`` into timing rounds; every row lands in exactly one part, no part is empty.

    Without ``batch_size``: ``min(rounds, rows)`` parts, part r holds rows r, r + R, r + 2R, … (so
    each part mixes the task types). With ``batch_size`` (B): rounds of whole engine batches, so that
    one engine answering all rounds in a row never puts two rounds in one batch: ``R = min(rounds,
    ⌈rows / B⌉)`` parts, each a run of B × k rows of the interleaved order (rows 0, R, 2R, …, then 1,
    1 + R, …), k = ⌈rows / B⌉ / R (the first parts one batch more when it does not divide); the one
    short batch, if any, ends the last part."""
    rows = prompts.num_rows
    if batch_size is None:
        n = max(1, min(rounds, rows))
        return [prompts.take(list(range(r, rows, n))) for r in range(n)]
    batches = max(1, math.ceil(rows / batch_size))
    n = max(1, min(rounds, batches))
    order = [i for r in range(n) for i in range(r, rows, n)]
    per = [batches // n + (r < batches % n) for r in range(n)]
    parts, start = [], 0
    for r in range(n):
        end = rows if r == n - 1 else start + per[r] * batch_size
        parts.append(prompts.take(order[start:end]))
        start = end
    return parts


def answer_rounds(parts: list[pa.Table], model: str, engine: EngineConfig, gen, storage=None) -> pa.Table:
    """One model answers every round with one engine: the rounds' prompts go, round after round, as
    blocks of ``engine.batch_size`` rows (a block never holds two rounds; ``split_rounds`` with that
    batch size makes every round but the last whole batches) into one ``answer_dataset`` (one engine
    start, one actor pool) instead of one engine per round.

    Returns the answers (``GENERATED_SCHEMA`` + ``round``: int32, the part's index), in the order of
    the parts. Raises RuntimeError when a prompt is missing from the answers or answered twice."""
    import ray

    from .generate import GENERATED_SCHEMA
    from .generate.answer import answer_dataset

    size = engine.batch_size
    blocks = [part.slice(i, size) for part in parts for i in range(0, part.num_rows, size)]
    out = answer_dataset(ray.data.from_arrow(blocks), model, engine, gen, storage)
    batches = list(out.iter_batches(batch_format="pyarrow", batch_size=None))
    table = pa.concat_tables(batches) if batches else GENERATED_SCHEMA.empty_table()
    where = {pid: (r, i) for r, part in enumerate(parts) for i, pid in enumerate(part.column("prompt_id").to_pylist())}
    ids = table.column("prompt_id").to_pylist()
    if len(ids) != len(where) or set(ids) != set(where):
        raise RuntimeError(f"{model}: the engine returned {len(ids)} answers for {len(where)} prompts (missing e.g. "
                           f"{sorted(set(where) - set(ids))[:10]}, duplicated e.g. "
                           f"{sorted({i for i in ids if ids.count(i) > 1})[:10]})")
    table = table.take(sorted(range(len(ids)), key=lambda k: where[ids[k]]))
    return table.append_column("round", pa.array([where[i][0] for i in table.column("prompt_id").to_pylist()],
                                                 pa.int32()))


def round_figures(table: pa.Table) -> dict:
    """Timing figures of one model in one round: latency_ms_p50, output_tokens_per_s, answers."""
    lat = [x * 1000 for x, e in zip(table.column("latency_s").to_pylist(), table.column("error").to_pylist())
           if e is None and x is not None]
    return {"latency_ms_p50": _percentile(lat, 50), "output_tokens_per_s": engine_throughput(table) if lat else None,
            "answers": len(lat)}


TIMING_KEYS = ("latency_ms_p50", "latency_ms_p95", "latency_ms_per_token_p50", "output_tokens_per_s")


def timing_figures(table: pa.Table | None) -> dict:
    """``TIMING_KEYS`` of one model from a table with ``latency_s``, ``response_tokens``, ``batch_id``
    and ``error`` (answers, or served requests), as ``model_report`` computes them; all None for
    ``None`` (a model without timing figures) or a table without an answered row."""
    if table is None:
        return dict.fromkeys(TIMING_KEYS)
    ok = [r for r in table.select(["latency_s", "response_tokens", "error"]).to_pylist()
          if r["error"] is None and r["latency_s"] is not None]
    lat_ms = [r["latency_s"] * 1000 for r in ok]
    per_token = [r["latency_s"] * 1000 / r["response_tokens"] for r in ok if r["response_tokens"]]
    return {"latency_ms_p50": _percentile(lat_ms, 50), "latency_ms_p95": _percentile(lat_ms, 95),
            "latency_ms_per_token_p50": _percentile(per_token, 50),
            "output_tokens_per_s": engine_throughput(table) if lat_ms else None}


def ratio_spread(values: list[float | None], max_spread: float) -> dict:
    """Summary of one ratio measured in several rounds.

    Args:
        values: the ratio per round (None where a round has none).
        max_spread: ``eval.max_ratio_spread``.
    Returns:
        ``{median, min, max, spread, per_round, trusted}``: median/min/max over the rounds that
        have a value (None if none); spread = (max - min) / median (None with fewer than two
        values or a zero median); trusted = spread <= max_spread (None when spread is None).
    """
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"median": None, "min": None, "max": None, "spread": None, "per_round": list(values), "trusted": None}
    med = statistics.median(vals)
    spread = (max(vals) - min(vals)) / med if len(vals) >= 2 and med > 0 else None
    return {"median": med, "min": min(vals), "max": max(vals), "spread": spread, "per_round": list(values),
            "trusted": None if spread is None else spread <= max_spread}


def timing_ratios(per_round: list[dict[str, dict]], student: str, max_spread: float) -> dict:
    """``student`` / teacher ratios of latency p50 and of tokens/s, one per round, summarised by
    ``ratio_spread``. ``per_round``: for each round, model name → ``round_figures``."""
    out = {}
    for key in ("latency_ms_p50", "output_tokens_per_s"):
        vals = [_ratio(r[student][key], r["teacher"][key]) for r in per_round]
        out[key] = ratio_spread(vals, max_spread)
    return out


# ----------------------------------------------------------------------------- the report

def build_report(answers: dict[str, pa.Table], model_info: dict[str, dict], *, split: str, teacher: str,
                 engine: str, label_map: dict | None, max_ratio_spread: float, warn_retained_below: float,
                 extra: dict | None = None, marker: str = "####",
                 timing: dict[str, pa.Table | None] | None = None, settings: dict[str, dict] | None = None) -> dict:
    """The report dict (see module docstring) from the answers of the three models.

    Args:
        answers: model name → answers (``GENERATED_SCHEMA`` columns + ``round``: int), the same
            prompts in the same order for every model.
        model_info: model name → probe and size figures (``params``, ``dtype``, ``device``,
            ``model_memory_mb``, ``process_baseline_mb``, ``peak_memory_mb``, ``size_mb``,
            ``size_dtype``, ``path``; missing ones become null), plus an optional ``note`` (a warning).
        extra: more top-level keys (``prompt_source``, ``limit``, ``data_changed_since_corpus``, ...).
        marker: ``task_prompts.final_answer_marker``, read before math and QA final answers.
        timing: model name → the table its latency and throughput figures come from instead of its
            answers (served requests: ``latency_s``, ``response_tokens``, ``batch_id``, ``error``,
            ``round``), or None for no timing figures (null); models not in it are timed by their answers.
        settings: model name → the timed engine's settings (``timing_settings``: batch_size, replicas,
            concurrency, gpus), reported as ``timing.settings``; ``gpus`` > 0 gives
            ``output_tokens_per_s_per_gpu`` and its student/teacher ratio.
    Returns:
        A dict that ``json.dumps(..., allow_nan=False)`` accepts.
    """
    models: dict[str, dict] = {}
    for name in MODEL_NAMES:
        rep = model_report(answers[name], answers["teacher"], label_map, marker)
        if timing is not None and name in timing:
            rep.update(timing_figures(timing[name]))
        info = dict(model_info.get(name, {}))
        info.pop("note", None)
        for key in ("params", "dtype", "model_memory_mb", "process_baseline_mb", "peak_memory_mb", "size_mb",
                    "size_dtype", "path"):
            rep[key] = info.get(key)
        per_param = BYTES_PER_PARAM.get(rep["dtype"] or "")
        rep["size_mb_eval_dtype"] = round(rep["params"] * per_param / 1e6, 2) if rep["params"] and per_param else None
        gpus = (settings or {}).get(name, {}).get("gpus")
        rep["output_tokens_per_s_per_gpu"] = (rep["output_tokens_per_s"] / gpus
                                              if gpus and rep["output_tokens_per_s"] is not None else None)
        models[name] = rep

    import pyarrow.compute as pc

    def in_round(table: pa.Table, r: int) -> pa.Table:
        return table.filter(pc.equal(table.column("round"), r)) if "round" in table.column_names else table

    def timed_in_round(name: str, r: int) -> dict:
        if timing is not None and name in timing:
            if timing[name] is None:
                return {"latency_ms_p50": None, "output_tokens_per_s": None, "answers": 0}
            return round_figures(in_round(timing[name], r))
        return round_figures(in_round(answers[name], r))

    teacher_rows = answers["teacher"]
    rounds = sorted(set(teacher_rows.column("round").to_pylist())) if "round" in teacher_rows.column_names else [0]
    per_round = [{"round": r, "prompts": in_round(teacher_rows, r).num_rows,
                  "models": {name: timed_in_round(name, r) for name in MODEL_NAMES}}
                 for r in rounds]
    compared = {}
    t = models["teacher"]
    for name in STUDENTS:
        s = models[name]
        compared[name] = {
            "params": _ratio(s["params"], t["params"]),
            "size_mb_eval_dtype": _ratio(s["size_mb_eval_dtype"], t["size_mb_eval_dtype"]),
            "model_memory_mb": _ratio(s["model_memory_mb"], t["model_memory_mb"]),
            **timing_ratios([p["models"] for p in per_round], name, max_ratio_spread),
        }
        s_gpus, t_gpus = ((settings or {}).get(n, {}).get("gpus") for n in (name, "teacher"))
        tps = compared[name]["output_tokens_per_s"]["per_round"]
        compared[name]["output_tokens_per_s_per_gpu"] = ratio_spread(
            [v * t_gpus / s_gpus if v is not None and s_gpus and t_gpus else None for v in tps], max_ratio_spread)
    tasks = teacher_rows.column("task").to_pylist()
    report = {
        "split": split, "prompts": teacher_rows.num_rows,
        "prompts_by_task": {k: tasks.count(k) for k in sorted(set(tasks))},
        "teacher": teacher, "engine": engine,
        **(extra or {}),
        "memory_probe": {"engine": "transformers", "max_new_tokens": 32,
                         "batch": next((i.get("batch") for i in model_info.values() if i.get("batch")), None),
                         "models": {n: {"dtype": model_info.get(n, {}).get("dtype"),
                                        "device": model_info.get(n, {}).get("device")} for n in MODEL_NAMES}},
        "thresholds": {"max_ratio_spread": max_ratio_spread, "warn_retained_below": warn_retained_below,
                       "repeat_coverage": REPEAT_COVERAGE, "degenerate_share": DEGENERATE_SHARE},
        "warnings": [],
        "models": models,
        "timing": {"rounds": len(per_round), "per_round": per_round, "settings": settings},
        "compared_to_teacher": compared,
        "retained": retained(models["student"], models["teacher"]),
        "retained_baseline": retained(models["baseline_student"], models["teacher"]),
    }
    report["warnings"] = build_warnings(report, answers, model_info)
    for name, table in (timing or {}).items():
        errors = [e for e in table.column("error").to_pylist() if e is not None] if table is not None else []
        if errors:
            report["warnings"].append(f"{name}: {len(errors)} of the {table.num_rows} requests to the endpoint "
                                      f"failed (e.g. {errors[0][:160]}); they are left out of its timing figures")
    from .runtime import finite

    return finite(report)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def build_warnings(report: dict, answers: dict[str, pa.Table], model_info: dict[str, dict]) -> list[str]:
    """The report's ``warnings``: every reason not to take its figures at face value."""
    out: list[str] = []
    m, th = report["models"], report["thresholds"]
    for key, change in (report.get("data_changed_since_corpus") or {}).items():
        out.append(f"{key} differs from the corpus's settings (corpus {change['corpus']!r}, now {change['now']!r}): "
                   "the corpus's own split was evaluated (corpus/prompts/), not today's data settings")
    for name in MODEL_NAMES:
        rep = m[name]
        total = rep["answers"] + rep["errors"]
        if rep["errors"]:
            first = next((e for e in answers[name].column("error").to_pylist() if e is not None), "")
            if rep["answers"] == 0:
                out.append(f"{name} answered none of the {total} prompts (all failed, e.g. {first[:160]}): its "
                           "figures are null")
            else:
                out.append(f"{name}: {rep['errors']} of the {total} prompts failed (e.g. {first[:160]}); they are "
                           "left out of its figures")
        if rep["repetitive_share"] is not None and rep["repetitive_share"] > th["degenerate_share"]:
            out.append(f"{name}: degenerate output: {_pct(rep['repetitive_share'])} of answers repeat one token "
                       f"sequence over more than {_pct(th['repeat_coverage'])} of their length (longest run: "
                       f"{rep['max_repeat_run']} repeats)")
        if rep["identical_share"] is not None and rep["identical_share"] > th["degenerate_share"]:
            out.append(f"{name}: degenerate output: {_pct(rep['identical_share'])} of answers are the same text as "
                       "the answer to another prompt")
        note = model_info.get(name, {}).get("note")
        if note:
            out.append(f"{name}: {note}")
    unscorable: dict[str, int] = {}
    for name in MODEL_NAMES:
        for task, n in m[name]["unscorable"].items():
            unscorable[task] = max(unscorable.get(task, 0), n)
    for task, n in sorted(unscorable.items()):
        out.append(f"{task}: {n} reference(s) could not be scored (no label or number the scorer reads) and are "
                   "left out of its metrics; map labels with data.label_map")
    q = report["retained"]["quality"]
    if q is not None and q < th["warn_retained_below"]:
        out.append(f"student retains {q:.3f} of the teacher's quality, below eval.warn_retained_below "
                   f"({th['warn_retained_below']})")
    def answered(name: str) -> set[str]:
        t = answers[name]
        return {pid for pid, err in zip(t.column("prompt_id").to_pylist(), t.column("error").to_pylist())
                if err is None}

    for name in STUDENTS:
        differ = answered(name) ^ answered("teacher")
        if differ and m[name]["answers"] and m["teacher"]["answers"]:
            out.append(f"{name} and the teacher answered different prompts ({len(differ)} answered by only one of "
                       "them): its quality and timing ratios compare different prompt sets")
    t_len = m["teacher"]["finish_length_share"]
    for name in STUDENTS:
        s_len = m[name]["finish_length_share"]
        if s_len is not None and t_len is not None and s_len > t_len + 0.25:
            out.append(f"{name}: {_pct(s_len)} of answers ran to the token limit (teacher: {_pct(t_len)}), "
                       "which makes it slower per answer")
    for name in STUDENTS:
        for key, label in (("latency_ms_p50", "latency p50"), ("output_tokens_per_s", "tokens/s")):
            r = report["compared_to_teacher"][name][key]
            if r["trusted"] is False:
                rounds = report["timing"]["rounds"]
                out.append(f"{name}/teacher {label} ratio varies by {_pct(r['spread'])} over {rounds} "
                           f"rounds (min {r['min']:.2f}, max {r['max']:.2f}), above eval.max_ratio_spread "
                           f"({th['max_ratio_spread']}): the machine's load changed while timing; do not trust it")
    return out


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def _fmt_ratio(r: dict, what: str) -> str:
    """A ratio summary over rounds: '0.51× the teacher's (rounds 0.48–0.55, spread 8%)'."""
    if r["median"] is None:
        return "n/a"
    text = f"{r['median']:.2f}× {what} (rounds {r['min']:.2f}–{r['max']:.2f}"
    text += f", spread {_pct(r['spread'])})" if r["spread"] is not None else ", one round: spread unknown)"
    if r["trusted"] is False:
        text += " **not to be trusted: machine load**"
    return text


def _settings_text(report: dict) -> str:
    """' (every model at batch 16, 1 replica, 1 batch in flight; GPUs: teacher 8, student 1)' from
    ``timing.settings``, or '' without settings; says so when the models' loads differ."""
    settings = report["timing"].get("settings")
    if not settings or "teacher" not in settings or "student" not in settings:
        return ""
    t, s = settings["teacher"], settings["student"]
    load = (f"batch {s['batch_size']}, {s['replicas']} replica(s), {s['concurrency']} batch(es) in flight")
    same = all(t[k] == s[k] for k in ("batch_size", "replicas", "concurrency"))
    if same:
        text = f"every model at {load}"
    else:
        text = (f"**different loads**: student at {load}, teacher at batch {t['batch_size']}, {t['replicas']} "
                f"replica(s), {t['concurrency']} batch(es) in flight")
    return f" ({text}; GPUs: teacher {_fmt(t['gpus'])}, student {_fmt(s['gpus'])})"


def corpus_rejects(corpus) -> dict | None:
    """``report.json``'s ``corpus_rejects`` from the corpus manifest (``corpus.read_manifest``):
    ``{"rows_kept": int | None, "rows_rejected": int, "rejects": {reason: count}}``, or None when
    the manifest records no filtering (an older corpus) or cannot be read."""
    from .corpus import read_manifest

    try:
        manifest = read_manifest(corpus)
    except (FileNotFoundError, ValueError):
        return None
    rejects = manifest.get("rejects")
    if not isinstance(rejects, dict):
        return None
    counts = {str(k): int(v) for k, v in rejects.items()}
    return {"rows_kept": manifest.get("rows"), "rows_rejected": sum(counts.values()), "rejects": counts}


def _rejects_markdown(rejects: dict | None) -> list[str]:
    """report.md's "Teacher corpus" section (nothing when the corpus recorded no filtering)."""
    if not rejects:
        return []
    lines = ["", "## Teacher corpus", "",
             f"{_fmt(rejects.get('rows_kept'), 0)} teacher answers kept for training, "
             f"{_fmt(rejects['rows_rejected'], 0)} left out (the rows are in `corpus/rejects/` with their reason).", ""]
    if rejects["rejects"]:
        lines += ["| reject reason | rows |", "|---|---|"]
        lines += [f"| {reason} | {_fmt(n, 0)} |" for reason, n in rejects["rejects"].items()]
    return lines


def _timing_source_markdown(source: dict | None) -> list[str]:
    """report.md's sentence on where latency and throughput come from (nothing for the engine)."""
    if not source or source.get("latency_source") != "serve":
        return []
    served = [n for n, s in source["models"].items() if s == "serve"]
    unserved = [n for n, s in source["models"].items() if s is None]
    text = (f"Latency and throughput of {' and '.join(served)} come from the running endpoint "
            f"`{source['endpoint']}` (`eval.latency_source: serve`; the same prompts and rounds, one request at a "
            f"time, streaming); quality figures come from the engine's answers.")
    if unserved:
        text += f" Not served, so no timing figures (n/a): {', '.join(unserved)}."
    return [text, ""]


def write_markdown(report: dict, answers: dict[str, pa.Table], path: Path) -> None:
    """report.md: warnings first, then the summary, timing rounds, per-task quality, examples.
    Missing values print as n/a; nothing here divides by a missing figure."""
    m = report["models"]
    names = list(MODEL_NAMES)
    lines = ["# raydistill evaluation report", ""]
    if report["warnings"]:
        lines += ["## Warnings", ""] + [f"- {w}" for w in report["warnings"]] + [""]
    by_task = ", ".join(f"{k} {v}" for k, v in report.get("prompts_by_task", {}).items())
    probe = report["memory_probe"]
    dtypes = ", ".join(f"{n} {probe['models'][n]['dtype'] or 'n/a'} on {probe['models'][n]['device'] or 'n/a'}"
                       for n in names)
    lines += [f"Split `{report['split']}`, {report['prompts']} prompts ({by_task}); teacher `{report['teacher']}`; "
              f"engine `{report['engine']}`, timed in {report['timing']['rounds']} round(s), one engine per model. "
              f"Memory measured with {probe['engine']} (batch {_fmt(probe['batch'])}, {probe['max_new_tokens']} new "
              f"tokens) in each model's evaluation dtype: {dtypes}.", "",
              *_timing_source_markdown(report.get("timing_source")),
              "## Summary", "",
              "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    rows = [("quality (mean primary metric, 0–1)", "quality", 3),
            ("agreement with teacher (ROUGE-L, 0–1)", "agreement_rougeL", 3),
            ("prompts answered", "answers", 0), ("failed prompts (left out above)", "errors", 0),
            ("ended by themselves (finish stop)", "finish_stop_share", "%"),
            ("hit the token limit (finish length)", "finish_length_share", "%"),
            ("mean answer length (tokens)", "mean_output_tokens", 1),
            ("latency p50 per answer (ms)", "latency_ms_p50", 1), ("latency p95 per answer (ms)", "latency_ms_p95", 1),
            ("latency p50 per output token (ms/token)", "latency_ms_per_token_p50", 1),
            ("output tokens/s", "output_tokens_per_s", 1),
            ("output tokens/s per GPU", "output_tokens_per_s_per_gpu", 1),
            ("model memory: weights + activations (MB)", "model_memory_mb", 1),
            ("process baseline: interpreter + libraries (MB)", "process_baseline_mb", 1),
            ("peak process memory (MB)", "peak_memory_mb", 1), ("eval dtype", "dtype", 0),
            ("parameters", "params", 0), ("size on disk as stored (MB)", "size_mb", 1),
            ("stored dtype", "size_dtype", 0), ("size in eval dtype (MB)", "size_mb_eval_dtype", 1),
            ("repetitive answers", "repetitive_share", "%"),
            ("answers identical across prompts", "identical_share", "%"),
            ("degenerate output", "degenerate", 0)]
    for label, key, digits in rows:
        cells = [_pct(m[n].get(key)) if digits == "%" else _fmt(m[n].get(key), digits) for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    lines += _rejects_markdown(report.get("corpus_rejects"))
    lines += ["", "## Timing rounds", "",
              "Every model answers the same parts of the prompts (rounds), each in one engine for all its rounds.", "",
              "| round | prompts | " + " | ".join(f"{n} p50 (ms)" for n in names) +
              " | student/teacher latency | student/teacher tokens/s |", "|---|---|" + "---|" * (len(names) + 2)]
    for r in report["timing"]["per_round"]:
        f = r["models"]
        lat = _ratio(f["student"]["latency_ms_p50"], f["teacher"]["latency_ms_p50"])
        tps = _ratio(f["student"]["output_tokens_per_s"], f["teacher"]["output_tokens_per_s"])
        lines.append(f"| {r['round']} | {r['prompts']} | " + " | ".join(_fmt(f[n]["latency_ms_p50"], 1) for n in names)
                     + f" | {_fmt(lat, 2)} | {_fmt(tps, 2)} |")

    unscorable = {t for n in names for t in m[n]["unscorable"]}
    lines += ["", "## Quality per task", "", "| task | metric | " + " | ".join(names) +
              " | student retained | unscorable references |", "|---|---|" + "---|" * (len(names) + 2)]
    tasks = sorted(set(m["teacher"]["metrics"]) | unscorable | {t for n in names for t in m[n]["metrics"]})
    for task in tasks:
        metrics = next((m[n]["metrics"][task] for n in names if task in m[n]["metrics"]), {"-": None})
        bad = max(m[n]["unscorable"].get(task, 0) for n in names)
        for metric in metrics:
            vals = [m[n]["metrics"].get(task, {}).get(metric) for n in names]
            lines.append(f"| {task} | {metric} | " + " | ".join(_fmt(v) for v in vals) +
                         f" | {_fmt(report['retained'].get(f'{task}.{metric}'))} | {bad} |")

    s, t = m["student"], m["teacher"]
    cmp = report["compared_to_teacher"]["student"]
    theirs = "the teacher's"
    lines += ["", "## What the student kept and what it saves", "",
              f"- Quality retained: {_fmt(report['retained']['quality'])} of the teacher's "
              f"(baseline student: {_fmt(report['retained_baseline']['quality'])}).",
              f"- Agreement with the teacher: {_fmt(s['agreement_rougeL'])} vs "
              f"{_fmt(m['baseline_student']['agreement_rougeL'])} before distillation.",
              f"- Parameters: {_fmt(cmp['params'], 2)}× the teacher's; size in the eval dtype "
              f"{_fmt(cmp['size_mb_eval_dtype'], 2)}×; model memory {_fmt(cmp['model_memory_mb'], 2)}× "
              f"({_fmt(s['model_memory_mb'], 0)} vs {_fmt(t['model_memory_mb'], 0)} MB, besides a process "
              f"baseline of about {_fmt(t['process_baseline_mb'], 0)} MB).",
              f"- Latency p50 (median over rounds): {_fmt_ratio(cmp['latency_ms_p50'], theirs)}"
              f"{_settings_text(report)}.",
              f"- Output tokens/s (median over rounds): {_fmt_ratio(cmp['output_tokens_per_s'], theirs)}"
              f"{_settings_text(report)}; per GPU: {_fmt_ratio(cmp['output_tokens_per_s_per_gpu'], theirs)}.",
              f"- Answers that ended by themselves: student {_pct(s['finish_stop_share'])}, teacher "
              f"{_pct(t['finish_stop_share'])}; mean length {_fmt(s['mean_output_tokens'], 1)} vs "
              f"{_fmt(t['mean_output_tokens'], 1)} tokens.", "",
              "![quality vs latency](quality_vs_latency.png)", "", "![agreement](agreement.png)", "",
              "## Example answers", ""]
    tea = answers["teacher"].to_pylist()
    others = {n: answers[n].slice(0, 5).to_pylist() for n in names}
    for i in range(min(5, len(tea))):
        prompt = tea[i]["messages"][-1]["content"].replace("\n", " ")
        lines.append(f"**[{tea[i]['task']}] {prompt[:300]}**  ")
        if tea[i]["reference"] is not None:
            lines.append(f"- reference: {tea[i]['reference']}")
        for n in names:
            row = others[n][i]
            text = (row["response"] or "").strip().replace("\n", " ")
            if row["error"] is not None:
                text = f"(failed: {row['error'][:200]})"
            elif not text:
                text = f"(blank: {row['response_tokens']} tokens of whitespace or special tokens)"
            lines.append(f"- {n} ({row['finish_reason']}): {text[:300]}")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def write_plots(report: dict, folder: Path) -> list[Path]:
    """quality_vs_latency.png and agreement.png; models without a figure are left out (labelled n/a)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = report["models"]
    colors = dict(zip(MODEL_NAMES, ("tab:blue", "tab:gray", "tab:orange")))
    # Without references there is no task quality: agreement with the teacher is the quality axis.
    key, label = (("quality", "quality (mean primary metric)") if m["teacher"]["quality"] is not None
                  else ("agreement_rougeL", "agreement with teacher (ROUGE-L)"))
    fig, ax = plt.subplots(figsize=(6, 4))
    missing = []
    for name in MODEL_NAMES:
        x, y = m[name]["latency_ms_p50"], m[name][key]
        if x is None or y is None:
            missing.append(name)
            continue
        ax.scatter(x, y, s=80, color=colors[name], label=name)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 4))
    if missing:
        ax.text(0.02, 0.02, "n/a (no answered prompt or no figure): " + ", ".join(missing),
                transform=ax.transAxes, fontsize=8)
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("latency p50 per answer (ms)")
    ax.set_ylabel(label)
    ax.set_title("Quality vs latency")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    p1 = folder / "quality_vs_latency.png"
    fig.savefig(p1, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    vals = [m[n]["agreement_rougeL"] for n in MODEL_NAMES]
    ax.bar(list(MODEL_NAMES), [v or 0.0 for v in vals], color=[colors[n] for n in MODEL_NAMES])
    for i, v in enumerate(vals):
        ax.annotate("n/a" if v is None else f"{v:.2f}", (i, v or 0.0), ha="center", textcoords="offset points",
                    xytext=(0, 3))
    ax.set_ylabel("ROUGE-L vs teacher answer")
    ax.set_ylim(0, 1.1)
    ax.set_title("Agreement with the teacher")
    fig.tight_layout()
    p2 = folder / "agreement.png"
    fig.savefig(p2, dpi=100)
    plt.close(fig)
    return [p1, p2]


def write_report(folder: Path, report: dict, answers: dict[str, pa.Table]) -> None:
    """Write report.json, report.md and the plots into ``folder``. A plot that fails becomes a
    warning; report.json is strict JSON (ValueError on NaN, which build_report never leaves)."""
    try:
        write_plots(report, folder)
    except Exception as e:  # a figure must not cost the report
        log.exception("evaluate: plots failed")
        report["warnings"].append(f"plots could not be drawn: {type(e).__name__}: {e}")
    (folder / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False))
    write_markdown(report, answers, folder / "report.md")


# ----------------------------------------------------------------------------- inputs

def memory_probe(model_dir: str, messages: list, batch: int, dtype: str | None = None,
                 device: str | None = None) -> dict:
    """Run ``raydistill._probe`` in a fresh Python process (see its docstring for the keys).

    ``dtype``/``device``: as the model's evaluation engine ran it (default float32 on CPU).
    Raises RuntimeError with the probe's stderr when it fails.
    """
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    args = [sys.executable, "-m", "raydistill._probe", model_dir]
    if dtype:
        args += ["--dtype", dtype]
    if device:
        args += ["--device", device]
    # Prompts go through stdin: a command-line argument is capped at 128 KiB on Linux.
    proc = subprocess.run(args, input=json.dumps(messages[:batch]), capture_output=True, text=True, env=env,
                          timeout=1800)
    if proc.returncode != 0:
        lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
        raise RuntimeError(f"memory probe failed for {model_dir}: {lines[-1] if lines else f'exit {proc.returncode}'}"
                           f"\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _remote_probe(ref: str, messages: list, batch: int, dtype: str, device: str, storage: dict | None) -> dict:
    """``memory_probe`` in a Ray task: reads ``ref`` on the task's node (``storage.local_copy``)."""
    from .storage import local_copy

    return memory_probe(local_copy(ref, storage), messages, batch, dtype, device)


def _probe(path: str, ref: str, engine: EngineConfig, messages: list, batch: int, dtype: str, device: str,
           storage=None) -> dict:
    """``memory_probe`` where the model runs: here (``path``), unless the model is in S3 (``ref``
    ``s3://``: the driver holds no weights) or runs on a GPU this process does not see (a job's
    driver on a CPU head node); then in a Ray task with 1 CPU, or 1 GPU of the engine's
    ``accelerator_type``, which reads ``ref`` on its own node. The results are ``memory_probe``'s."""
    from .runtime import on_gpu_machine
    from .storage import is_remote

    if not is_remote(ref) and (device != "cuda" or on_gpu_machine()):
        return memory_probe(path, messages, batch, dtype, device)
    import ray

    if not ray.is_initialized():  # run_evaluate starts it; a probe alone does not start a Ray
        raise RuntimeError(f"memory probe of {ref} runs in a Ray task, and Ray is not started")
    options: dict = {"num_cpus": 1, "num_gpus": 1 if device == "cuda" else 0}
    if getattr(engine, "accelerator_type", None):
        options["accelerator_type"] = engine.accelerator_type
    task = ray.remote(_remote_probe).options(**options)
    return ray.get(task.remote(ref, messages, batch, dtype, device, storage.model_dump() if storage else None))


def model_files(path: str, ref: str | None = None, storage=None) -> tuple[float | None, str | None]:
    """(size of the weight files in MB, their dtype from config.json) of a local model folder, or of
    a hub id in the local HF cache (no download); (None, None) when neither is found. With an
    ``s3://`` ``ref`` the size comes from its S3 listing (``path`` may then hold no weights)."""
    from .models import _WEIGHT_SUFFIXES, size_on_disk_mb
    from .storage import is_remote, remote_listing

    folder = Path(path)
    if ref and is_remote(ref):
        sizes = [s for name, (s, _) in remote_listing(ref, storage).items() if name.endswith(_WEIGHT_SUFFIXES)]
        size = round(sum(sizes) / 1e6, 2) if sizes else None
    else:
        if not folder.is_dir():
            try:
                from huggingface_hub import snapshot_download

                folder = Path(snapshot_download(path, local_files_only=True))
            except Exception:  # not cached, not a hub id: unknown, not an error
                return None, None
        size = round(size_on_disk_mb(folder), 2)
    config = folder / "config.json"
    stored = None
    if config.is_file():
        cfg = json.loads(config.read_text())
        stored = cfg.get("dtype") or cfg.get("torch_dtype")
    return size, stored


def _flat(d: dict, prefix: str) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "label_map":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def data_changes(corpus, cfg: Config) -> dict[str, dict]:
    """``data.<key>`` → {corpus, now} for each data setting that differs from the corpus's
    ``config.yaml`` ({} when the corpus has none). ``corpus``: a local path, ``s3://`` URI or
    ``storage.StoragePath``."""
    import yaml

    from .corpus import location

    file = location(corpus) / "config.yaml"
    if not file.is_file():
        return {}
    then = _flat((yaml.safe_load(file.read_text()) or {}).get("data") or {}, "data.")
    now = _flat(cfg.data.model_dump(mode="json"), "data.")
    return {k: {"corpus": then.get(k), "now": now.get(k)} for k in sorted(set(then) | set(now))
            if then.get(k) != now.get(k)}


def _messages_key(messages: list[dict]) -> str:
    """The overlap check's key of a prompt: ``data.split_key`` of its non-system messages (the task
    system prompt that generate adds differs by task; the question asked is what counts)."""
    from .data import split_key

    return split_key([m for m in messages if m["role"] != "system"])


def check_unseen(corpus, prompts: pa.Table, split: str = "test") -> None:
    """Raise SchemaError when an evaluated prompt was trained on: its id, or its messages (``_messages_key``:
    roles and normalized contents, the task system prompt left out), equal a train row's of the corpus
    (``data/``). The message names the counts and up to 10 example ids of each kind.

    Streams the train rows' ``prompt_id`` and ``messages`` shard by shard with the split filter pushed
    into the parquet reader; the driver holds the evaluated prompts' keys only, not the train set."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from .corpus import PROMPTS_DIR, location, read_manifest
    from .schema import SchemaError

    loc = location(corpus)
    ids = prompts.column("prompt_id").to_pylist()
    keys: dict[str, str] = {}
    for pid, msgs in zip(ids, prompts.column("messages").to_pylist()):
        keys.setdefault(_messages_key(msgs), pid)
    wanted = set(ids)
    same_id: list[str] = []
    same_msgs: list[tuple[str, str]] = []
    shards = [(loc / f).path for f in read_manifest(loc).get("shards", [])]
    if shards:
        dataset = pads.dataset(shards, format="parquet", filesystem=loc.fs)
        for batch in dataset.to_batches(columns=["prompt_id", "messages"], filter=pc.field("split") == "train"):
            for pid, msgs in zip(batch.column("prompt_id").to_pylist(), batch.column("messages").to_pylist()):
                if pid in wanted:
                    same_id.append(pid)
                elif (test_id := keys.get(_messages_key(msgs))) is not None:
                    same_msgs.append((test_id, pid))
    if not same_id and not same_msgs:
        return
    parts = []
    if same_id:
        parts.append(f"{len(same_id)} share a train row's prompt id ({', '.join(sorted(same_id)[:10])}"
                     f"{' …' if len(same_id) > 10 else ''})")
    if same_msgs:
        tests = {t for t, _ in same_msgs}
        parts.append(f"{len(tests)} have the same messages as {len(same_msgs)} train row(s) under other ids ("
                     + ", ".join(f"{split} {t} = train {r}" for t, r in sorted(same_msgs)[:10])
                     + f"{' …' if len(same_msgs) > 10 else ''})")
    raise SchemaError(f"{len(set(same_id) | {t for t, _ in same_msgs})} of the {prompts.num_rows} {split} prompt(s) of "
                      f"{loc / PROMPTS_DIR} were trained on (train rows of the corpus in {loc / 'data'}): "
                      f"{'; '.join(parts)}. Regenerate the corpus (`raydistill generate --overwrite`: the split "
                      "now keeps identical prompts, and data.group_field's groups, in one split)")


def load_eval_prompts(cfg: Config) -> tuple[pa.Table, dict[str, dict]]:
    """The prompts to evaluate and the data settings changed since the corpus.

    Reads the ``eval.split`` rows of ``corpus/prompts/`` (the split written by generate),
    keeps a sample of ``eval.limit`` spread over tasks (``data.sample_by_task``, seed ``data.seed``),
    in the order of ``train.examples.order_keys`` (``data.seed``, prompt id) whatever the files' order.
    Raises FileNotFoundError without a finished corpus or prompts/, SchemaError when an
    evaluated id is in two splits, or an evaluated prompt's id or messages are a train row's of the
    corpus (``check_unseen``: counts and example ids), and ValueError when the split is empty.
    """
    from .corpus import PROMPTS_DIR, read_prompts
    from .data import sample_by_task
    from .layout import corpus_location

    corpus = corpus_location(cfg)  # local or s3://
    prompts = read_prompts(corpus, (cfg.eval.split,))
    changes = data_changes(corpus, cfg)
    for key, change in changes.items():
        log.warning("evaluate: %s is %r now but %r when the corpus was made; the corpus's own %s split is "
                    "evaluated (%s)", key, change["now"], change["corpus"], cfg.eval.split, corpus / PROMPTS_DIR)
    check_unseen(corpus, prompts, cfg.eval.split)
    if prompts.num_rows == 0:
        raise ValueError(f"the {cfg.eval.split} split of {corpus / PROMPTS_DIR} is empty; raise "
                         f"data.split.{cfg.eval.split} and rerun `raydistill generate`")
    if cfg.eval.limit:
        prompts = sample_by_task(prompts, cfg.eval.limit, cfg.data.seed)
    # One order (a hash of data.seed and the id), not the order generate's Ray tasks wrote prompts/
    # in: the engines' batches, whose numerics depend on their rows, are the same on every run.
    import pyarrow.compute as pc

    from .train.examples import order_keys

    return prompts.take(pc.sort_indices(order_keys(prompts.column("prompt_id").to_pylist(), cfg.data.seed))), changes


def timed_engines(cfg: Config) -> dict[str, EngineConfig]:
    """The engine each model answers with in the timed rounds: one generation path for all three
    (``eval.engine``; an API teacher through ``openai``), and the same load for every model, so the
    ratios compare like with like: ``eval.batch_size`` prompts per batch, ``eval.replicas`` replicas,
    one batch in flight per replica (per-batch timings then add up to engine time). The teacher keeps
    what its model needs (tensor/pipeline parallelism, GPUs per replica, dtype, max length); the
    students use ``eval.*``. ``timing_settings`` states the result per model."""
    same = {"batch_size": cfg.eval.batch_size, "replicas": cfg.eval.replicas, "max_concurrent_batches": 1}
    engine = "openai" if cfg.teacher.engine == "openai" else cfg.eval.engine
    return {"teacher": cfg.teacher.model_copy(update={"engine": engine, **same}),
            "baseline_student": cfg.eval.model_copy(update=same), "student": cfg.eval.model_copy(update=same)}


def engine_gpus(engine: EngineConfig) -> float | None:
    """GPUs one engine holds: replicas × GPUs per replica (vLLM: at least tensor × pipeline parallel
    size); 0 on CPU; None for an API endpoint (unknown)."""
    if engine.engine == "openai":
        return None
    if _engine_device(engine)[1] != "cuda":
        return 0
    per = engine.gpus_per_replica
    if engine.engine == "vllm":
        per = max(per, engine.tensor_parallel_size * getattr(engine, "pipeline_parallel_size", 1))
    return engine.replicas * per


def timing_settings(engines: dict[str, EngineConfig]) -> dict[str, dict]:
    """``report.json``'s ``timing.settings``: per model the engine, ``batch_size``, ``replicas``,
    ``concurrency`` (batches in flight at once: replicas × max_concurrent_batches) and ``gpus``
    (``engine_gpus``: the divisor of ``output_tokens_per_s_per_gpu``; 0 on CPU, null for an API)."""
    return {name: {"engine": e.engine, "batch_size": e.batch_size, "replicas": e.replicas,
                   "concurrency": e.replicas * e.max_concurrent_batches, "gpus": engine_gpus(e)}
            for name, e in engines.items()}


def _engine_device(engine: EngineConfig) -> tuple[str, str]:
    """(dtype, device) the evaluation engine runs a model in (as ``generate`` decides)."""
    from .runtime import on_gpu_machine

    gpu = engine.gpus_per_replica > 0 or (engine.engine == "vllm" and (engine.asks_gpu() or on_gpu_machine()))
    dtype = engine.dtype if engine.dtype != "auto" else ("bfloat16" if gpu else "float32")
    return dtype, "cuda" if gpu else "cpu"


def _model_info(path: str, engine: EngineConfig, probe_msgs: list, batch: int, ref: str | None = None,
                storage=None) -> dict:
    """Probe and size figures of one model; a failed probe leaves its figures null, with a note.
    An API teacher (``engine`` ``openai``) is not probed: its figures are null, with a note; nor is
    a model whose engine spans several GPUs (tensor or pipeline parallelism: one device cannot
    hold it). ``path``: the model on this machine; ``ref``: what a probe on another node reads
    (its ``s3://`` URI; default ``path``), see ``_probe``."""
    if engine.engine == "openai":
        return {"path": path, "dtype": None, "device": None, "size_mb": None, "size_dtype": None,
                "note": "memory and parameter figures are null: the teacher is an API endpoint "
                        "(teacher.engine=openai), there is no local model to probe"}
    dtype, device = _engine_device(engine)
    info: dict = {"path": path, "dtype": dtype, "device": device}
    info["size_mb"], info["size_dtype"] = model_files(path, ref, storage)
    shards = engine.tensor_parallel_size * getattr(engine, "pipeline_parallel_size", 1)
    if shards > 1:
        info["note"] = (f"memory and parameter figures are null: the engine spans {shards} GPUs (tensor × pipeline "
                        "parallel), and the probe loads the model on one device")
        return info
    try:
        probe = _probe(path, ref or path, engine, probe_msgs, batch, dtype, device, storage)
        info.update({k: probe.get(k) for k in ("params", "model_memory_mb", "process_baseline_mb", "peak_memory_mb",
                                               "batch")})
    except (RuntimeError, OSError, subprocess.TimeoutExpired, ValueError) as e:  # OSError: the model is gone
        log.error("evaluate: %s", e)
        first = (str(e).splitlines() or [repr(e)])[0]
        info["note"] = f"memory and parameter figures are null: {first[:300]}"
    return info


def run_evaluate(cfg: Config, overwrite: bool = False) -> dict:
    """Evaluate the three models on the held-out split and write ``eval/``. Returns the report.
    A finished evaluation of the same models and prompts with the same settings is returned as it
    is; one made with other settings is refused unless ``overwrite`` (``stages.evaluate_stage``).

    Raises FileNotFoundError when ``student/`` (or the pruned baseline) is missing (run train
    first) or the corpus lacks ``prompts/``; SchemaError when the evaluated prompts meet the
    train rows. Once the answers exist they are never lost: ``answers.parquet`` is written first
    and a later failure keeps ``eval.partial/`` (the log says so). With an ``s3://`` output_dir the
    students are read through a local copy and ``eval/`` is uploaded (see the module docstring).
    """
    from .layout import baseline_student_ref, student_dir
    from .models import resolve_model
    from .runtime import init_ray
    from .stages import evaluate_stage
    from .storage import is_remote, local_copy, storage_path

    stage = evaluate_stage(cfg)
    if stage.done(overwrite):
        return json.loads((stage.outputs["eval"] / "report.json").read_text())
    stage.forget()
    api_teacher = cfg.teacher.engine == "openai"  # answers from the endpoint; teacher.model is its model name
    paths = {"teacher": cfg.teacher.model if api_teacher else resolve_model(cfg.teacher.model),
             "baseline_student": (baseline_student_ref(cfg) if cfg.student.init == "prune"
                                  else resolve_model(baseline_student_ref(cfg))),
             "student": str(student_dir(cfg))}
    # Both are written by `raydistill train` (the baseline only for init=prune; otherwise it is student.model).
    written = ("baseline_student", "student") if cfg.student.init == "prune" else ("student",)
    shown = dict(paths)  # what the report calls each model (its S3 URI for an s3:// run)
    if is_remote(cfg.output_dir):
        out = storage_path(cfg.output_dir, cfg.storage)
        for name in written:
            shown[name] = (out / name).uri
            if not (out / name / "config.json").is_file():
                raise FileNotFoundError(f"no {name} at {shown[name]}: run `raydistill train` first")
        for name in written:
            paths[name] = local_copy(shown[name], cfg.storage, weights=False)  # the engines fetch the weights
            log.info("evaluate: %s %s: its config and tokenizer copied to %s", name, shown[name], paths[name])
    for name in written:
        if not (Path(paths[name]) / "config.json").is_file():
            raise FileNotFoundError(f"no {name} at {paths[name]}: run `raydistill train` first")
    prompts, changes = load_eval_prompts(cfg)
    endpoint = None
    if cfg.eval.latency_source == "serve":  # before any engine starts, not after the answers
        from .serve.client import api_key, check_endpoint, check_served_models, endpoint_url

        endpoint = endpoint_url(cfg)
        check_endpoint(endpoint, key=api_key(cfg))  # serve.api_key_env: the endpoint's key
        check_served_models(cfg, endpoint)  # the endpoint's student and teacher are this run's
    init_ray()
    gen = cfg.generation.model_copy(update={"top_k_logprobs": 0})
    engines = timed_engines(cfg)
    parts = split_rounds(prompts, cfg.eval.rounds, cfg.eval.batch_size)
    if len(parts) < cfg.eval.rounds:
        log.warning("evaluate: %d prompts in batches of %d, so %d timing rounds instead of eval.rounds=%d",
                    prompts.num_rows, cfg.eval.batch_size, len(parts), cfg.eval.rounds)
    order = {pid: i for i, pid in enumerate(prompts.column("prompt_id").to_pylist())}
    answers = {}
    for name in MODEL_NAMES:  # one engine per model for all its rounds (a 405B teacher loads once)
        log.info("evaluate: %s answers %d %s prompts in %d rounds with one engine", name, prompts.num_rows,
                 cfg.eval.split, len(parts))
        t0 = time.perf_counter()
        # an S3 student goes to the engines as its URI: each replica fetches it on its own node
        table = answer_rounds(parts, shown[name] if is_remote(shown[name]) else paths[name], engines[name], gen,
                              cfg.storage)
        log.info("evaluate: %s done in %.1f s (engine start included)", name, time.perf_counter() - t0)
        ids = table.column("prompt_id").to_pylist()
        answers[name] = table.take(sorted(range(table.num_rows), key=lambda i: order[ids[i]]))
    served = served_timing(cfg, parts, endpoint) if endpoint else None
    report = finish_evaluation(cfg, prompts, answers, paths, engines, changes, served, endpoint, shown=shown)
    stage.finish()
    return report


def _publish(local: Path, dest) -> None:
    """Upload the finished eval folder ``local`` to ``dest`` (a ``storage.StoragePath``), replacing
    what was there, ``report.json`` last: a ``dest`` without it (an upload cut short) is unfinished.
    ``local`` is left as it was."""
    from .storage import upload_dir

    report = local / "report.json"
    held = local.with_name(local.name + ".report.json")  # out of the folder while the rest goes up
    report.rename(held)
    try:
        upload_dir(local, dest)
    finally:
        held.rename(report)
    (dest / "report.json").write_bytes(report.read_bytes())


SERVED_MODELS = ("teacher", "student")


def served_timing(cfg: Config, parts: list[pa.Table], endpoint: str) -> dict[str, pa.Table]:
    """Send each round's prompts to the served teacher and student (``eval.latency_source: serve``).

    Round r sends ``parts[r]`` to both arms, one request at a time, the arm order alternating by
    round; one warm-up request per arm first (not kept). ``generation.*`` sampling. Returns model
    name → one row per request: ``prompt_id``, ``task``, ``round``, ``latency_s``, ``ttft_s``,
    ``response_tokens`` and ``prompt_tokens`` (the stream's usage), ``batch_id`` (one per request),
    ``answered_by``, ``error`` (null unless it failed)."""
    from .serve.client import api_key, run_requests

    key = api_key(cfg)
    g = cfg.generation
    sampling = {"max_tokens": g.max_new_tokens, "temperature": g.temperature, "top_p": g.top_p, "seed": g.seed}

    def msgs(part: pa.Table) -> list[list[dict]]:
        return [[{"role": m["role"], "content": m["content"]} for m in row] for row in part.column("messages").to_pylist()]

    for name in SERVED_MODELS:
        run_requests(endpoint, name, msgs(parts[0])[:1], 1, sampling, key=key)
    rows: dict[str, list[dict]] = {n: [] for n in SERVED_MODELS}
    for r, part in enumerate(parts):
        for name in SERVED_MODELS if r % 2 == 0 else SERVED_MODELS[::-1]:
            log.info("evaluate: round %d/%d: served %s answers %d prompts at %s", r + 1, len(parts), name,
                     part.num_rows, endpoint)
            records, _ = run_requests(endpoint, name, msgs(part), 1, sampling, key=key)
            for rec, pid, task in zip(records, part.column("prompt_id").to_pylist(), part.column("task").to_pylist(),
                                      strict=True):
                rows[name].append({"prompt_id": pid, "task": task, "round": r, "latency_s": rec.latency_s,
                                   "ttft_s": rec.ttft_s, "response_tokens": rec.output_tokens,
                                   "prompt_tokens": rec.prompt_tokens, "batch_id": f"serve-{name}-{r}-{rec.index}",
                                   "answered_by": rec.answered_by, "error": rec.error})
    schema = pa.schema([("prompt_id", pa.string()), ("task", pa.string()), ("round", pa.int32()),
                        ("latency_s", pa.float64()), ("ttft_s", pa.float64()), ("response_tokens", pa.int32()),
                        ("prompt_tokens", pa.int32()), ("batch_id", pa.string()), ("answered_by", pa.string()),
                        ("error", pa.string())])
    return {n: pa.Table.from_pylist(rows[n], schema=schema) for n in SERVED_MODELS}


def finish_evaluation(cfg: Config, prompts: pa.Table, answers: dict[str, pa.Table], paths: dict[str, str],
                      engines: dict[str, EngineConfig], changes: dict[str, dict],
                      served: dict[str, pa.Table] | None = None, endpoint: str | None = None,
                      shown: dict[str, str] | None = None) -> dict:
    """Everything after the answers: write ``answers.parquet`` first (into ``eval.partial/``), probe
    memory, build and write the report, then rename ``eval.partial/`` to ``eval/``. Returns the report.
    With an ``s3://`` output_dir both folders are built locally, ``eval.partial/answers.parquet`` is
    uploaded at once and ``eval/`` is uploaded when complete (``report.json`` last, see ``_publish``).

    ``answers``: model name → answers in prompt order (``GENERATED_SCHEMA`` + ``round``). A model
    that answered nothing or a probe that fails gives null figures and a warning; a plot that fails
    gives a warning. Any other failure re-raises and keeps ``eval.partial/answers.parquet`` (logged).
    ``served``: model name → its requests to ``endpoint`` (``served_timing``) when ``eval.latency_source``
    is ``serve``: their figures replace those models' timing figures, the other models get none, and
    the requests are written to ``served.parquet``. ``shown``: model name → the reference the report
    gives as its ``path`` (default: ``paths``; the S3 URI of a student read through a local copy).
    """
    import tempfile

    import pyarrow.parquet as pq

    from .corpus import PROMPTS_DIR
    from .layout import corpus_location, eval_dir
    from .runtime import provenance
    from .storage import storage_path, upload_dir

    out = storage_path(cfg.output_dir, cfg.storage)
    staging = Path(tempfile.mkdtemp(prefix="raydistill-eval-")) if out.remote else None
    folder = staging / "eval" if staging else eval_dir(cfg)
    tmp = folder.with_name("eval.partial")
    kept = tmp  # where the answers stay after a failure (in the run's storage once uploaded)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pq.write_table(pa.concat_tables([answers[n].append_column("model", pa.array([n] * answers[n].num_rows))
                                     for n in MODEL_NAMES]), tmp / "answers.parquet")
    timing = None
    source = {"latency_source": "engine", "models": dict.fromkeys(MODEL_NAMES, "engine"), "endpoint": None,
              "concurrency": None}
    if served is not None:
        pq.write_table(pa.concat_tables([t.append_column("model", pa.array([n] * t.num_rows))
                                         for n, t in served.items()]), tmp / "served.parquet")
        timing = {n: served.get(n) for n in MODEL_NAMES}
        source = {"latency_source": "serve", "models": {n: "serve" if n in served else None for n in MODEL_NAMES},
                  "endpoint": endpoint, "concurrency": 1}
    try:
        if staging:  # the answers in the run's storage before anything else can fail
            upload_dir(tmp, out / "eval.partial")
            kept = out / "eval.partial"
        probe_msgs = [list(m) for m in prompts.column("messages").to_pylist()[: cfg.eval.memory_probe_batch]]
        info = {name: _model_info(paths[name], engines[name], probe_msgs, cfg.eval.memory_probe_batch,
                                  (shown or {}).get(name, paths[name]), cfg.storage)
                for name in MODEL_NAMES}
        for name, ref in (shown or {}).items():
            info[name]["path"] = ref
        report = build_report(
            answers, info, split=cfg.eval.split, teacher=cfg.teacher.model, engine=cfg.eval.engine,
            label_map=cfg.data.label_map, max_ratio_spread=cfg.eval.max_ratio_spread,
            warn_retained_below=cfg.eval.warn_retained_below, marker=cfg.task_prompts.final_answer_marker,
            extra={"prompt_source": str(corpus_location(cfg) / PROMPTS_DIR), "limit": cfg.eval.limit,
                   "data_changed_since_corpus": changes, "corpus_rejects": corpus_rejects(corpus_location(cfg)),
                   "timing_source": source, "provenance": provenance()}, timing=timing,
            settings=timing_settings(engines))
        write_report(tmp, report, answers)
        (tmp / "config.yaml").write_text(cfg.dump())
        if staging:
            # the complete evaluation beside the old eval/ first, then eval/ replaced: a failure
            # while eval/ is rewritten leaves the whole new evaluation in eval.partial/
            _publish(tmp, out / "eval.partial")
            _publish(tmp, out / "eval")
    except BaseException:
        log.error("evaluate: failed after every model had answered; the answers are kept in %s%s "
                  "(the next `raydistill evaluate` starts afresh and removes that folder)", kept / "answers.parquet",
                  f" and {tmp}" if staging and kept is not tmp else "")
        raise
    if staging:  # published: the staging folder and eval.partial/ have done their work
        shutil.rmtree(staging, ignore_errors=True)
        try:
            kept.delete()
        except OSError as e:
            log.warning("evaluate: %s could not be removed (%s); eval/ is complete", kept.uri, e)
    if staging:
        folder = out / "eval"
    else:
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    for w in report["warnings"]:
        log.warning("evaluate: %s", w)
    log.info("evaluate: agreement with teacher %s (baseline %s), quality retained %s -> %s",
             _fmt(report["models"]["student"]["agreement_rougeL"]),
             _fmt(report["models"]["baseline_student"]["agreement_rougeL"]),
             _fmt(report["retained"]["quality"]), folder / "report.md")
    return report
