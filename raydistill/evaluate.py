"""The evaluate stage: teacher, baseline student and distilled student on held-out prompts.

All three models answer the same prompts through the same batch generation path
(``generate.generate_table`` with engine ``eval.engine``, vLLM by default); the teacher runs with
the ``teacher.*`` engine resources, the students with ``eval.*``. Written under ``output_dir/eval/``:
``answers.parquet``, ``report.json``, ``report.md``, ``quality_vs_latency.png``,
``agreement.png``.

Figures per model (``report.json`` → ``models.<name>``):
- ``metrics``: task → metric → value (see ``raydistill.tasks``);
- ``quality``: mean of each task's primary metric (accuracy or ROUGE-L), 0–1; null without references;
- ``agreement_rougeL``: mean ROUGE-L F1 of the answer against the teacher's answer, 0–1;
- ``errors``: prompts that failed (e.g. longer than the engine's max length), left out of the
  other figures;
- ``latency_ms_p50`` / ``latency_ms_p95``: per-answer latency (request sent → last token), ms;
- ``output_tokens_per_s``: generated tokens / engine time, the sum over engine batches (run one
  at a time) of the batch's slowest answer (engine start-up excluded);
- ``peak_memory_mb``: see ``raydistill._probe`` (transformers, one batch, fresh process);
- ``params``: parameter count; ``size_mb``: weight files on disk (MB = 10^6 bytes).
``retained`` (top level, and ``retained_baseline``): student metric / teacher metric for each
``task.metric`` and ``quality``; null where the teacher scored 0 (the ratio is undefined).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa

from .config import Config
from .generate import engine_throughput
from .tasks import PRIMARY, rouge_l, score

log = logging.getLogger(__name__)

MODEL_NAMES = ("teacher", "baseline_student", "student")


def _percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0–100), as numpy's default."""
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


def memory_probe(model_dir: str, messages: list, batch: int) -> dict:
    """Run ``raydistill._probe`` in a fresh Python process; returns peak_memory_mb and params."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    # Prompts go through stdin: a command-line argument is capped at 128 KiB on Linux.
    proc = subprocess.run([sys.executable, "-m", "raydistill._probe", model_dir], input=json.dumps(messages[:batch]),
                          capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed for {model_dir}:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def model_report(table: pa.Table, teacher: pa.Table) -> dict:
    """Quality, agreement and latency figures of one model's answers (see module docstring).

    Rows that failed (``error`` set, e.g. a prompt longer than the engine's max length) are
    counted in ``errors`` and left out of every other figure; agreement uses the rows that
    both this model and the teacher answered.
    """
    rows = table.to_pylist()
    ok = [r for r in rows if r["error"] is None]
    by_task: dict[str, tuple[list[str], list]] = {}
    for r in ok:
        preds, refs = by_task.setdefault(r["task"], ([], []))
        preds.append(r["response"])
        refs.append(r["reference"])
    metrics = {task: ms for task, (p, refs) in sorted(by_task.items()) if (ms := score(task, p, refs))}
    primary = [m[PRIMARY[t]] for t, m in metrics.items() if PRIMARY[t] in m]
    lat_ms = [r["latency_s"] * 1000 for r in ok]
    both = [(r["response"], t["response"]) for r, t in zip(rows, teacher.to_pylist(), strict=True)
            if r["error"] is None and t["error"] is None]
    return {
        "metrics": metrics,
        "quality": sum(primary) / len(primary) if primary else None,
        "agreement_rougeL": rouge_l([a for a, _ in both], [b for _, b in both]) if both else None,
        "latency_ms_p50": _percentile(lat_ms, 50),
        "latency_ms_p95": _percentile(lat_ms, 95),
        "output_tokens_per_s": engine_throughput(table),
        "answers": len(ok),
        "errors": len(rows) - len(ok),
        "mean_output_tokens": sum(r["response_tokens"] for r in ok) / max(1, len(ok)),
    }


def retained(student: dict, teacher: dict) -> dict[str, float | None]:
    """student / teacher per ``task.metric`` and for ``quality``; None where the teacher is 0."""
    out: dict[str, float | None] = {}
    for task, ms in teacher["metrics"].items():
        for metric, t_val in ms.items():
            s_val = student["metrics"].get(task, {}).get(metric)
            out[f"{task}.{metric}"] = (s_val / t_val) if (s_val is not None and t_val) else None
    out["quality"] = (student["quality"] / teacher["quality"]
                      if teacher["quality"] and student["quality"] is not None else None)
    return out


def _fmt(v, digits=3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def write_markdown(report: dict, answers: dict[str, pa.Table], path: Path) -> None:
    m = report["models"]
    names = list(MODEL_NAMES)
    lines = ["# raydistill evaluation report", "",
             f"Split `{report['split']}`, {report['prompts']} prompts; teacher `{report['teacher']}`; "
             f"engine `{report['engine']}`.", "",
             "## Summary", "",
             "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    rows = [("quality (mean primary metric, 0–1)", "quality"),
            ("agreement with teacher (ROUGE-L, 0–1)", "agreement_rougeL"),
            ("latency p50 (ms)", "latency_ms_p50"), ("latency p95 (ms)", "latency_ms_p95"),
            ("output tokens/s", "output_tokens_per_s"), ("peak memory (MB)", "peak_memory_mb"),
            ("parameters", "params"), ("size on disk (MB)", "size_mb"),
            ("mean answer length (tokens)", "mean_output_tokens"),
            ("failed prompts (left out above)", "errors")]
    for label, key in rows:
        digits = 3 if key in ("quality", "agreement_rougeL") else 1
        lines.append(f"| {label} | " + " | ".join(_fmt(m[n][key], digits) if key != "params"
                                                  else f"{m[n][key]:,}" for n in names) + " |")
    lines += ["", "## Quality per task", "", "| task | metric | " + " | ".join(names) +
              " | student retained |", "|---|---|" + "---|" * (len(names) + 1)]
    for task, ms in m["teacher"]["metrics"].items():
        for metric in ms:
            vals = [m[n]["metrics"].get(task, {}).get(metric) for n in names]
            lines.append(f"| {task} | {metric} | " + " | ".join(_fmt(v) for v in vals) +
                         f" | {_fmt(report['retained'].get(f'{task}.{metric}'))} |")
    s, t = m["student"], m["teacher"]
    lines += ["", "## What the student kept and what it saves", "",
              f"- Quality retained: {_fmt(report['retained']['quality'])} of the teacher's "
              f"(baseline student: {_fmt(report['retained_baseline']['quality'])}).",
              f"- Agreement with the teacher: {_fmt(s['agreement_rougeL'])} vs "
              f"{_fmt(m['baseline_student']['agreement_rougeL'])} before distillation.",
              f"- Parameters: {s['params'] / t['params']:.2f}× the teacher's; size on disk "
              f"{s['size_mb'] / t['size_mb']:.2f}×; peak memory {s['peak_memory_mb'] / t['peak_memory_mb']:.2f}×.",
              f"- Latency p50: {s['latency_ms_p50'] / t['latency_ms_p50']:.2f}× the teacher's; throughput "
              f"{s['output_tokens_per_s'] / max(t['output_tokens_per_s'], 1e-9):.2f}×.", "",
              "![quality vs latency](quality_vs_latency.png)", "", "![agreement](agreement.png)", "",
              "## Example answers", ""]
    tea = answers["teacher"].to_pylist()
    for i in range(min(5, len(tea))):
        prompt = tea[i]["messages"][-1]["content"].replace("\n", " ")
        lines.append(f"**[{tea[i]['task']}] {prompt}**  ")
        if tea[i]["reference"] is not None:
            lines.append(f"- reference: {tea[i]['reference']}")
        for n in names:
            row = answers[n].slice(i, 1).to_pylist()[0]
            text = row["response"].strip().replace("\n", " ")
            if row["error"] is not None:
                text = f"(failed: {row['error'][:200]})"
            elif not text:
                text = f"(blank: {row['response_tokens']} tokens of whitespace or special tokens)"
            lines.append(f"- {n}: {text[:300]}")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def write_plots(report: dict, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = report["models"]
    # Without references there is no task quality: agreement with the teacher is the quality axis.
    key, label = (("quality", "quality (mean primary metric)") if m["teacher"]["quality"] is not None
                  else ("agreement_rougeL", "agreement with teacher (ROUGE-L)"))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, color in zip(MODEL_NAMES, ("tab:blue", "tab:gray", "tab:orange")):
        ax.scatter(m[name]["latency_ms_p50"], m[name][key], s=80, color=color, label=name)
        ax.annotate(name, (m[name]["latency_ms_p50"], m[name][key]), textcoords="offset points", xytext=(6, 4))
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
    vals = [m[n]["agreement_rougeL"] or 0.0 for n in MODEL_NAMES]  # None: no answered prompt
    ax.bar(list(MODEL_NAMES), vals, color=["tab:blue", "tab:gray", "tab:orange"])
    ax.set_ylabel("ROUGE-L vs teacher answer")
    ax.set_ylim(0, 1.05)
    ax.set_title("Agreement with the teacher")
    fig.tight_layout()
    p2 = folder / "agreement.png"
    fig.savefig(p2, dpi=100)
    plt.close(fig)
    return [p1, p2]


def run_evaluate(cfg: Config) -> dict:
    """Evaluate the three models on the held-out split and write ``eval/``. Returns the report.

    Raises FileNotFoundError when ``student/`` (or the pruned baseline) is missing: run train first.
    """
    from .data import load_prompts, select_split
    from .generate import generate_table
    from .models import resolve_model, size_on_disk_mb
    from .runtime import init_ray, provenance
    from .layout import baseline_student_ref

    out = Path(cfg.output_dir)
    paths = {"teacher": resolve_model(cfg.teacher.model), "baseline_student": (baseline_student_ref(cfg) if cfg.student.init == "prune"
                                                          else resolve_model(baseline_student_ref(cfg))),
             "student": str(out / "student")}
    # Both are written by `raydistill train` (the baseline only for init=prune; otherwise it is student.model).
    for name in ("baseline_student", "student") if cfg.student.init == "prune" else ("student",):
        if not (Path(paths[name]) / "config.json").is_file():
            raise FileNotFoundError(f"no {name} at {paths[name]}: run `raydistill train` first")
    prompts = select_split(load_prompts(cfg.data), (cfg.eval.split,))
    if cfg.eval.limit:
        prompts = prompts.slice(0, cfg.eval.limit)
    if prompts.num_rows == 0:
        raise ValueError(f"the {cfg.eval.split} split is empty; raise data.split.{cfg.eval.split}")
    init_ray()
    gen = cfg.generation.model_copy(update={"top_k_logprobs": 0})
    # One generation path for all three (eval.engine); the teacher keeps its own resources
    # (tensor parallelism, dtype, max length), the students use eval.*.
    # Batches one at a time, so that per-batch timings add up to engine time (tokens/s).
    one = {"max_concurrent_batches": 1}
    engines = {"teacher": cfg.teacher.model_copy(update={"engine": cfg.eval.engine, **one}),
               "baseline_student": cfg.eval.model_copy(update=one), "student": cfg.eval.model_copy(update=one)}
    answers: dict[str, pa.Table] = {}
    for name in MODEL_NAMES:
        log.info("evaluate: %s answers %d %s prompts", name, prompts.num_rows, cfg.eval.split)
        t0 = time.perf_counter()
        answers[name] = generate_table(prompts, paths[name], engines[name], gen)
        log.info("evaluate: %s done in %.1f s", name, time.perf_counter() - t0)
    probe_msgs = [list(m) for m in prompts.column("messages").to_pylist()]
    models = {}
    for name in MODEL_NAMES:
        rep = model_report(answers[name], answers["teacher"])
        rep.update(memory_probe(paths[name], probe_msgs, cfg.eval.memory_probe_batch))
        rep["size_mb"] = round(size_on_disk_mb(paths[name]), 2) if Path(paths[name]).is_dir() else None
        rep["path"] = paths[name]
        models[name] = rep
    report = {"split": cfg.eval.split, "prompts": prompts.num_rows, "teacher": cfg.teacher.model,
              "engine": cfg.eval.engine, "provenance": provenance(), "models": models,
              "retained": retained(models["student"], models["teacher"]),
              "retained_baseline": retained(models["baseline_student"], models["teacher"])}
    folder = out / "eval"
    tmp = out / "eval.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    import pyarrow.parquet as pq

    pq.write_table(pa.concat_tables([answers[n].append_column("model", pa.array([n] * answers[n].num_rows))
                                     for n in MODEL_NAMES]), tmp / "answers.parquet")
    write_plots(report, tmp)
    write_markdown(report, answers, tmp / "report.md")
    (tmp / "report.json").write_text(json.dumps(report, indent=2))
    (tmp / "config.yaml").write_text(cfg.dump())
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    log.info("evaluate: agreement with teacher %.3f (baseline %.3f), quality retained %s -> %s",
             models["student"]["agreement_rougeL"], models["baseline_student"]["agreement_rougeL"],
             _fmt(report["retained"]["quality"]), folder / "report.md")
    return report
