"""The evaluation's files from a finished report dict: report.json, report.md and the two plots.

``write_report`` writes them into a folder (a plot that fails becomes a warning); ``write_markdown``
and ``write_plots`` do one file each; ``fmt`` / ``pct`` print a figure (n/a for a missing one).
Computes no figure (``figures``, ``report``) and publishes nothing (``run``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa

from ..stats import ratio
from .figures import MODEL_NAMES

log = logging.getLogger(__name__)


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def fmt(v, digits: int = 3) -> str:
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
    text += f", spread {pct(r['spread'])})" if r["spread"] is not None else ", one round: spread unknown)"
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
    return f" ({text}; GPUs: teacher {fmt(t['gpus'])}, student {fmt(s['gpus'])})"


def _rejects_markdown(rejects: dict | None) -> list[str]:
    """report.md's "Teacher corpus" section (nothing when the corpus recorded no filtering)."""
    if not rejects:
        return []
    lines = ["", "## Teacher corpus", "",
             f"{fmt(rejects.get('rows_kept'), 0)} teacher answers kept for training, "
             f"{fmt(rejects['rows_rejected'], 0)} left out (the rows are in `corpus/rejects/` with their reason).", ""]
    if rejects["rejects"]:
        lines += ["| reject reason | rows |", "|---|---|"]
        lines += [f"| {reason} | {fmt(n, 0)} |" for reason, n in rejects["rejects"].items()]
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
    gate = report.get("gate")
    if gate:
        verdict = "passed" if gate["passed"] else "**failed**"
        short = "; fell short: " + ", ".join(f"`{k}` {v:.3f}" for k, v in gate["short"].items()) if gate["short"] else ""
        unmeasured = "; not measured: " + ", ".join(f"`{k}`" for k in gate["unmeasured"]) if gate["unmeasured"] else ""
        lines += [f"Quality gate (`eval.min_retained` = {gate['min_retained']}): {verdict}{short}{unmeasured}.", ""]
    if report["warnings"]:
        lines += ["## Warnings", ""] + [f"- {w}" for w in report["warnings"]] + [""]
    by_task = ", ".join(f"{k} {v}" for k, v in report.get("prompts_by_task", {}).items())
    probe = report["memory_probe"]
    dtypes = ", ".join(f"{n} {probe['models'][n]['dtype'] or 'n/a'} on {probe['models'][n]['device'] or 'n/a'}"
                       for n in names)
    lines += [f"Split `{report['split']}`, {report['prompts']} prompts ({by_task}); teacher `{report['teacher']}`; "
              f"engine `{report['engine']}`, timed in {report['timing']['rounds']} round(s), one engine per model. "
              f"Memory measured with {probe['engine']} (batch {fmt(probe['batch'])}, {probe['max_new_tokens']} new "
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
        cells = [pct(m[n].get(key)) if digits == "%" else fmt(m[n].get(key), digits) for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    lines += _comparison_markdown(report.get("comparison"))
    lines += _rejects_markdown(report.get("corpus_rejects"))
    lines += ["", "## Timing rounds", "",
              "Every model answers the same parts of the prompts (rounds), each in one engine for all its rounds.", "",
              "| round | prompts | " + " | ".join(f"{n} p50 (ms)" for n in names) +
              " | student/teacher latency | student/teacher tokens/s |", "|---|---|" + "---|" * (len(names) + 2)]
    for r in report["timing"]["per_round"]:
        f = r["models"]
        lat = ratio(f["student"]["latency_ms_p50"], f["teacher"]["latency_ms_p50"])
        tps = ratio(f["student"]["output_tokens_per_s"], f["teacher"]["output_tokens_per_s"])
        lines.append(f"| {r['round']} | {r['prompts']} | " + " | ".join(fmt(f[n]["latency_ms_p50"], 1) for n in names)
                     + f" | {fmt(lat, 2)} | {fmt(tps, 2)} |")

    unscorable = {t for n in names for t in m[n]["unscorable"]}
    lines += ["", "## Quality per task", "", "| task | metric | " + " | ".join(names) +
              " | student retained | unscorable references |", "|---|---|" + "---|" * (len(names) + 2)]
    tasks = sorted(set(m["teacher"]["metrics"]) | unscorable | {t for n in names for t in m[n]["metrics"]})
    for task in tasks:
        metrics = next((m[n]["metrics"][task] for n in names if task in m[n]["metrics"]), {"-": None})
        bad = max(m[n]["unscorable"].get(task, 0) for n in names)
        for metric in metrics:
            vals = [m[n]["metrics"].get(task, {}).get(metric) for n in names]
            lines.append(f"| {task} | {metric} | " + " | ".join(fmt(v) for v in vals) +
                         f" | {fmt(report['retained'].get(f'{task}.{metric}'))} | {bad} |")

    s, t = m["student"], m["teacher"]
    cmp = report["compared_to_teacher"]["student"]
    theirs = "the teacher's"
    lines += ["", "## What the student kept and what it saves", "",
              f"- Quality retained: {fmt(report['retained']['quality'])} of the teacher's "
              f"(baseline student: {fmt(report['retained_baseline']['quality'])}).",
              f"- Agreement with the teacher: {fmt(s['agreement_rougeL'])} vs "
              f"{fmt(m['baseline_student']['agreement_rougeL'])} before distillation.",
              f"- Parameters: {fmt(cmp['params'], 2)}× the teacher's; size in the eval dtype "
              f"{fmt(cmp['size_mb_eval_dtype'], 2)}×; model memory {fmt(cmp['model_memory_mb'], 2)}× "
              f"({fmt(s['model_memory_mb'], 0)} vs {fmt(t['model_memory_mb'], 0)} MB, besides a process "
              f"baseline of about {fmt(t['process_baseline_mb'], 0)} MB).",
              f"- Latency p50 (median over rounds): {_fmt_ratio(cmp['latency_ms_p50'], theirs)}"
              f"{_settings_text(report)}.",
              f"- Output tokens/s (median over rounds): {_fmt_ratio(cmp['output_tokens_per_s'], theirs)}"
              f"{_settings_text(report)}; per GPU: {_fmt_ratio(cmp['output_tokens_per_s_per_gpu'], theirs)}.",
              f"- Answers that ended by themselves: student {pct(s['finish_stop_share'])}, teacher "
              f"{pct(t['finish_stop_share'])}; mean length {fmt(s['mean_output_tokens'], 1)} vs "
              f"{fmt(t['mean_output_tokens'], 1)} tokens.", "",
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


def _comparison_markdown(comp: dict | None) -> list[str]:
    """The student of this run beside another run's (``eval.compare_to``); nothing without one."""
    if not comp:
        return []
    labels = {"quality": "student quality (0–1)", "agreement_rougeL": "student agreement with teacher (ROUGE-L)",
              "repetitive_share": "repetitive answers", "identical_share": "answers identical across prompts",
              "finish_stop_share": "ended by themselves", "latency_ms_p50": "student latency p50 (ms)",
              "output_tokens_per_s": "student output tokens/s"}
    shares = {"repetitive_share", "identical_share", "finish_stop_share"}
    lines = ["", f"## Compared with another run (`{comp['report']}`)", "", "| | this run | other run |", "|---|---|---|"]
    for key, pair in comp["student"].items():
        show = pct if key in shares else (lambda v: fmt(v, 3 if key in ("quality", "agreement_rougeL") else 1))
        lines.append(f"| {labels.get(key, key)} | {show(pair['this'])} | {show(pair['other'])} |")
    for key, pair in comp["retained"].items():
        lines.append(f"| retained {key} | {fmt(pair['this'], 3)} | {fmt(pair['other'], 3)} |")
    return lines


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
