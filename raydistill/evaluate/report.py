"""The report dict of an evaluation: the figures of the three models put together, and its warnings.

``build_report`` assembles ``report.json`` (every key documented in docs/report.md) from the
answers, the probe figures and the timing tables; ``build_warnings`` lists every reason not to
take its figures at face value; ``run_keys`` gives the keys that come from the run rather than the
answers (prompt source, data changes, the corpus's filtering counts from ``corpus_rejects``, timing
source, provenance). Writes nothing (``render`` writes the files) and runs no model.
"""

from __future__ import annotations

import pyarrow as pa

from ..config import Config
from .figures import (
    BYTES_PER_PARAM,
    DEGENERATE_SHARE,
    MODEL_NAMES,
    REPEAT_COVERAGE,
    STUDENTS,
    model_report,
    ratio,
    ratio_spread,
    retained,
    round_figures,
    timing_figures,
    timing_ratios,
)
from .render import pct


def build_report(answers: dict[str, pa.Table], model_info: dict[str, dict], *, split: str, teacher: str,
                 engine: str, label_map: dict | None, max_ratio_spread: float, warn_retained_below: float,
                 extra: dict | None = None, marker: str = "####",
                 timing: dict[str, pa.Table | None] | None = None, settings: dict[str, dict] | None = None,
                 min_retained: float | None = None, compare_to: tuple[str, dict] | None = None) -> dict:
    """The report dict (every key in docs/report.md) from the answers of the three models.

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
        min_retained: ``eval.min_retained``, judged by ``quality_gate`` into ``gate`` (None: no gate).
        compare_to: another run's report (``other_report``), set beside this one in ``comparison``.
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
            "params": ratio(s["params"], t["params"]),
            "size_mb_eval_dtype": ratio(s["size_mb_eval_dtype"], t["size_mb_eval_dtype"]),
            "model_memory_mb": ratio(s["model_memory_mb"], t["model_memory_mb"]),
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
    report["gate"] = quality_gate(report["retained"], min_retained)
    report["comparison"] = comparison(report, compare_to)
    report["warnings"] = build_warnings(report, answers, model_info)
    for name, table in (timing or {}).items():
        errors = [e for e in table.column("error").to_pylist() if e is not None] if table is not None else []
        if errors:
            report["warnings"].append(f"{name}: {len(errors)} of the {table.num_rows} requests to the endpoint "
                                      f"failed (e.g. {errors[0][:160]}); they are left out of its timing figures")
    from ..runtime import finite

    return finite(report)


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
            out.append(f"{name}: degenerate output: {pct(rep['repetitive_share'])} of answers repeat one token "
                       f"sequence over more than {pct(th['repeat_coverage'])} of their length (longest run: "
                       f"{rep['max_repeat_run']} repeats)")
        if rep["identical_share"] is not None and rep["identical_share"] > th["degenerate_share"]:
            out.append(f"{name}: degenerate output: {pct(rep['identical_share'])} of answers are the same text as "
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
            out.append(f"{name}: {pct(s_len)} of answers ran to the token limit (teacher: {pct(t_len)}), "
                       "which makes it slower per answer")
    for name in STUDENTS:
        for key, label in (("latency_ms_p50", "latency p50"), ("output_tokens_per_s", "tokens/s")):
            r = report["compared_to_teacher"][name][key]
            if r["trusted"] is False:
                rounds = report["timing"]["rounds"]
                out.append(f"{name}/teacher {label} ratio varies by {pct(r['spread'])} over {rounds} "
                           f"rounds (min {r['min']:.2f}, max {r['max']:.2f}), above eval.max_ratio_spread "
                           f"({th['max_ratio_spread']}): the machine's load changed while timing; do not trust it")
    return out


def corpus_rejects(corpus) -> dict | None:
    """``report.json``'s ``corpus_rejects`` from the corpus manifest (``corpus.read_manifest``):
    ``{"rows_kept": int | None, "rows_rejected": int, "rejects": {reason: count}}``, or None when
    the manifest records no filtering (an older corpus) or cannot be read."""
    from ..corpus import read_manifest

    try:
        manifest = read_manifest(corpus)
    except (FileNotFoundError, ValueError):
        return None
    rejects = manifest.get("rejects")
    if not isinstance(rejects, dict):
        return None
    counts = {str(k): int(v) for k, v in rejects.items()}
    return {"rows_kept": manifest.get("rows"), "rows_rejected": sum(counts.values()), "rejects": counts}


def quality_gate(retained_figures: dict[str, float | None], min_retained: float | None) -> dict | None:
    """``eval.min_retained`` judged on the student's ``retained`` figures (``figures.retained``:
    ``quality`` and every strict ``task.metric``): ``{"min_retained", "passed", "short", "unmeasured"}``
    where ``short`` maps each figure below the bar to its value and ``unmeasured`` lists the figures
    that are null (the teacher scored 0, or a model gave no score). It passes when nothing is short
    and ``quality`` was measured. None when ``min_retained`` is None (no gate)."""
    if min_retained is None:
        return None
    short = {k: v for k, v in retained_figures.items() if v is not None and v < min_retained}
    unmeasured = sorted(k for k, v in retained_figures.items() if v is None)
    return {"min_retained": min_retained, "passed": not short and retained_figures.get("quality") is not None,
            "short": short, "unmeasured": unmeasured}


def gate_failure(report: dict) -> str | None:
    """The sentence saying why ``report``'s quality gate failed, or None (passed, or no gate)."""
    gate = report.get("gate")
    if not gate or gate["passed"]:
        return None
    parts = [f"{k} {v:.3f}" for k, v in gate["short"].items()]
    if "quality" in gate["unmeasured"]:
        parts.append("quality not measured (the teacher scored 0 or no score)")
    return (f"quality gate failed: the student retains less than eval.min_retained={gate['min_retained']} of the "
            f"teacher: {', '.join(parts)}")


#: the student figures a comparison with another run shows (``models.student`` keys)
COMPARED_FIGURES = ("quality", "agreement_rougeL", "repetitive_share", "identical_share", "finish_stop_share",
                    "latency_ms_p50", "output_tokens_per_s")


def other_report(cfg: Config) -> tuple[str, dict] | None:
    """``eval.compare_to`` read: (the report.json's URI, the report), or None when not set. Accepts
    the report file, its ``eval/`` folder or the run's output_dir. Raises FileNotFoundError when no
    report.json is there and ValueError when it is not a raydistill report."""
    import json

    from ..layout import eval_of
    from ..storage import storage_path

    ref = cfg.eval.compare_to
    if not ref:
        return None
    where = storage_path(ref, cfg.storage)
    for candidate in (where, where / "report.json", eval_of(where) / "report.json"):
        if candidate.uri.endswith("report.json") and candidate.is_file():
            try:
                other = json.loads(candidate.read_text())
            except ValueError as e:
                raise ValueError(f"eval.compare_to: {candidate.uri} is not JSON ({e})") from None
            if not isinstance(other, dict) or not {"models", "retained"} <= set(other):
                raise ValueError(f"eval.compare_to: {candidate.uri} is not a raydistill report.json "
                                 "(no models or retained)")
            return candidate.uri, other
    raise FileNotFoundError(f"eval.compare_to: no report.json at {ref} (nor in its eval/ folder)")


def comparison(report: dict, other: tuple[str, dict] | None) -> dict | None:
    """This run's student beside ``other``'s (``other_report``): ``report`` (its URI), ``student``
    (each of ``COMPARED_FIGURES``: ``{"this", "other"}``) and ``retained`` (each figure of either
    run's ``retained``: ``{"this", "other"}``, null where a run lacks it). None without ``other``."""
    if other is None:
        return None
    uri, rep = other
    mine, theirs = report["models"]["student"], rep["models"].get("student", {})
    keys = list(report["retained"]) + [k for k in rep["retained"] if k not in report["retained"]]
    return {"report": uri,
            "student": {k: {"this": mine.get(k), "other": theirs.get(k)} for k in COMPARED_FIGURES},
            "retained": {k: {"this": report["retained"].get(k), "other": rep["retained"].get(k)} for k in keys}}


def run_keys(cfg: Config, changes: dict[str, dict], served: dict[str, pa.Table] | None = None,
             endpoint: str | None = None) -> dict:
    """The top-level keys of ``report.json`` that come from the run, not from the answers (``extra``
    of ``build_report``): ``prompt_source``, ``limit``, ``data_changed_since_corpus`` (``changes``),
    ``corpus_rejects``, ``timing_source`` (the served models and ``endpoint`` when ``served``, see
    ``run.finish_evaluation``) and ``provenance``."""
    from ..corpus import PROMPTS_DIR
    from ..layout import baseline_pruning, corpus_location
    from ..runtime import provenance

    source = {"latency_source": "engine", "models": dict.fromkeys(MODEL_NAMES, "engine"), "endpoint": None,
              "concurrency": None}
    if served is not None:
        source = {"latency_source": "serve", "models": {n: "serve" if n in served else None for n in MODEL_NAMES},
                  "endpoint": endpoint, "concurrency": 1}
    return {"prompt_source": str(corpus_location(cfg) / PROMPTS_DIR), "limit": cfg.eval.limit,
            "data_changed_since_corpus": changes, "corpus_rejects": corpus_rejects(corpus_location(cfg)),
            "timing_source": source, "student_init": baseline_pruning(cfg), "provenance": provenance()}
