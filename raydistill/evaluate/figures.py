"""Per-answer and per-model figures of the evaluation, from answer tables alone.

Quality (task metrics, agreement with the teacher), how answers ended, degenerate output, latency
and throughput of one model (``model_report``), per round (``round_figures``) or from served
requests (``timing_figures``); student / teacher ratios (``retained``, ``timing_ratios``,
``ratio_spread``). Pure arithmetic on ``GENERATED_SCHEMA`` tables: no engine, no file, no Ray;
assembling the report is ``report``'s job. The keys are documented in docs/report.md.
"""

from __future__ import annotations

import math
import statistics

import pyarrow as pa

from ..generate import engine_throughput
from ..stats import percentile, ratio
from ..tasks import PRIMARY, rouge_l, score

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
    """Degenerate-output figures of one model's answered rows (see docs/report.md).

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
    that need an answered row are None when there is none (see docs/report.md for each key).
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
        "latency_ms_p50": percentile(lat_ms, 50),
        "latency_ms_p95": percentile(lat_ms, 95),
        "latency_ms_per_token_p50": percentile(per_token, 50),
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
            out[f"{task}.{metric}"] = ratio(student["metrics"].get(task, {}).get(metric), t_val)
    out["quality"] = ratio(student["quality"], teacher["quality"])
    return out


def round_figures(table: pa.Table) -> dict:
    """Timing figures of one model in one round: latency_ms_p50, output_tokens_per_s, answers."""
    lat = [x * 1000 for x, e in zip(table.column("latency_s").to_pylist(), table.column("error").to_pylist())
           if e is None and x is not None]
    return {"latency_ms_p50": percentile(lat, 50), "output_tokens_per_s": engine_throughput(table) if lat else None,
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
    return {"latency_ms_p50": percentile(lat_ms, 50), "latency_ms_p95": percentile(lat_ms, 95),
            "latency_ms_per_token_p50": percentile(per_token, 50),
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
        vals = [ratio(r[student][key], r["teacher"][key]) for r in per_round]
        out[key] = ratio_spread(vals, max_spread)
    return out
