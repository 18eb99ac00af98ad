"""The evaluate stage: teacher, baseline student and distilled student on held-out prompts.

Every model answers the ``eval.split`` prompts of ``corpus/prompts/`` (the split written once by
generate, checked against the corpus's train rows) through ``generate.answer_dataset``, one engine
per model for all its timing rounds, every model at the same load; the answers give quality,
agreement, degeneracy, latency and throughput figures, student / teacher ratios per round, and
warnings; a memory probe gives each model's memory and size. With ``eval.latency_source: serve``
the latency and throughput of the teacher and the student come from the running ``raydistill
serve`` endpoint instead. Written under ``output_dir/eval/``: ``answers.parquet``, ``report.json``,
``report.md`` and two plots, published whole (``eval.partial/`` first).

How each figure is made, the files written, and every key of ``report.json`` (type, unit, meaning):
docs/report.md.

Modules, one job each:

- ``prompts``: the prompts to evaluate (``load_eval_prompts``, ``check_unseen``, ``data_changes``);
- ``rounds``: the engine and load each model is timed with, the rounds, answering them, and the
  served endpoint's timing of the same rounds;
- ``figures``: per-answer and per-model figures and ratios, from answer tables alone;
- ``probes``: memory, parameter and size figures of a model (``raydistill._probe``);
- ``report``: the report dict and its warnings;
- ``render``: report.json, report.md and the plots;
- ``run``: the stage's driver (``run_evaluate``) and publishing ``eval/``.

Heavy imports (ray, torch, transformers, vllm, matplotlib) happen inside functions, never at import.
"""

from .run import run_evaluate

__all__ = ["run_evaluate"]
