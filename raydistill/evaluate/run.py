"""The evaluate stage's driver: resume check, inputs, answers, report, and publishing ``eval/``.

``run_evaluate`` runs the stage (the CLI's ``raydistill evaluate``); ``finish_evaluation`` is
everything after the answers: ``answers.parquet`` first into ``eval.partial/``, probes, the report,
then ``eval.partial/`` → ``eval/`` (uploaded, ``report.json`` last, for an ``s3://`` output_dir).
The figures, the report's shape and the files' contents are the other modules' (see
``raydistill.evaluate``).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import pyarrow as pa

from ..config import Config, EngineConfig
from .figures import MODEL_NAMES
from .probes import model_info
from .prompts import load_eval_prompts
from .render import fmt, write_report
from .report import build_report, other_report, run_keys
from .rounds import answer_rounds, served_timing, split_rounds, timed_engines, timing_settings

log = logging.getLogger(__name__)


def run_evaluate(cfg: Config, overwrite: bool = False) -> dict:
    """Evaluate the three models on the held-out split and write ``eval/``. Returns the report.
    A finished evaluation of the same models and prompts with the same settings is returned as it
    is; one made with other settings is refused unless ``overwrite`` (``stages.evaluate_stage``).

    Raises FileNotFoundError when ``student/`` (or the pruned baseline) is missing (run train
    first) or the corpus lacks ``prompts/``; SchemaError when the evaluated prompts meet the
    train rows. Once the answers exist they are never lost: ``answers.parquet`` is written first
    and a later failure keeps ``eval.partial/`` (the log says so). With an ``s3://`` output_dir the
    students are read through a local copy and ``eval/`` is uploaded (see docs/report.md, "Files").
    """
    from ..layout import baseline_location, baseline_student_ref, student_location
    from ..models import resolve_model
    from ..runtime import init_ray
    from ..stages import evaluate_stage
    from ..storage import is_remote, local_copy

    stage = evaluate_stage(cfg)
    if stage.done(overwrite):
        return json.loads((stage.outputs["eval"] / "report.json").read_text())
    other_report(cfg)  # a wrong eval.compare_to fails now, not after every model has answered
    stage.forget()
    api_teacher = cfg.teacher.engine == "openai"  # answers from the endpoint; teacher.model is its model name
    paths = {"teacher": cfg.teacher.model if api_teacher else resolve_model(cfg.teacher.model),
             "baseline_student": (baseline_student_ref(cfg) if cfg.student.init == "prune"
                                  else resolve_model(baseline_student_ref(cfg))),
             "student": student_location(cfg).uri}
    # Both are written by `raydistill train` (the baseline only for init=prune; otherwise it is student.model).
    written = ("baseline_student", "student") if cfg.student.init == "prune" else ("student",)
    shown = dict(paths)  # what the report calls each model (its S3 URI for an s3:// run)
    if is_remote(cfg.output_dir):
        locations = {"baseline_student": baseline_location, "student": student_location}
        for name in written:
            folder = locations[name](cfg)
            shown[name] = folder.uri
            if not (folder / "config.json").is_file():
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
        from ..serve.client import api_key, check_endpoint, check_served_models, endpoint_url

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


def finish_evaluation(cfg: Config, prompts: pa.Table, answers: dict[str, pa.Table], paths: dict[str, str],
                      engines: dict[str, EngineConfig], changes: dict[str, dict],
                      served: dict[str, pa.Table] | None = None, endpoint: str | None = None,
                      shown: dict[str, str] | None = None) -> dict:
    """Everything after the answers: write ``answers.parquet`` first (into ``eval.partial/``), probe
    memory, build and write the report, then rename ``eval.partial/`` to ``eval/``. Returns the report.
    With an ``s3://`` output_dir both folders are built locally, ``eval.partial/answers.parquet`` is
    uploaded at once and ``eval/`` is uploaded when complete (``report.json`` last, ``storage.publish_folder``).

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

    from ..layout import eval_location, eval_partial_location
    from ..storage import upload_dir

    dest, partial = eval_location(cfg), eval_partial_location(cfg)
    staging = Path(tempfile.mkdtemp(prefix="raydistill-eval-")) if dest.remote else None
    tmp = staging / partial.name if staging else partial.local()
    kept = tmp  # where the answers stay after a failure (in the run's storage once uploaded)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pq.write_table(pa.concat_tables([answers[n].append_column("model", pa.array([n] * answers[n].num_rows))
                                     for n in MODEL_NAMES]), tmp / "answers.parquet")
    timing = None
    if served is not None:
        pq.write_table(pa.concat_tables([t.append_column("model", pa.array([n] * t.num_rows))
                                         for n, t in served.items()]), tmp / "served.parquet")
        timing = {n: served.get(n) for n in MODEL_NAMES}
    try:
        if staging:  # the answers in the run's storage before anything else can fail
            upload_dir(tmp, partial)
            kept = partial
        probe_msgs = [list(m) for m in prompts.column("messages").to_pylist()[: cfg.eval.memory_probe_batch]]
        info = {name: model_info(paths[name], engines[name], probe_msgs, cfg.eval.memory_probe_batch,
                                  (shown or {}).get(name, paths[name]), cfg.storage, cfg.eval.memory_probe)
                for name in MODEL_NAMES}
        for name, ref in (shown or {}).items():
            info[name]["path"] = ref
        report = build_report(
            answers, info, split=cfg.eval.split, teacher=cfg.teacher.model, engine=cfg.eval.engine,
            label_map=cfg.data.label_map, max_ratio_spread=cfg.eval.max_ratio_spread,
            warn_retained_below=cfg.eval.warn_retained_below, marker=cfg.task_prompts.final_answer_marker,
            extra=run_keys(cfg, changes, served, endpoint), timing=timing,
            settings=timing_settings(engines), min_retained=cfg.eval.min_retained, compare_to=other_report(cfg))
        write_report(tmp, report, answers)
        (tmp / "config.yaml").write_text(cfg.dump())
        if staging:
            # the complete evaluation beside the old eval/ first, then eval/ replaced: a failure
            # while eval/ is rewritten leaves the whole new evaluation in eval.partial/
            from ..storage import publish_folder

            publish_folder(tmp, partial, last="report.json")
            publish_folder(tmp, dest, last="report.json")
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
        folder = dest
    else:
        folder = dest.local()
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    for w in report["warnings"]:
        log.warning("evaluate: %s", w)
    log.info("evaluate: agreement with teacher %s (baseline %s), quality retained %s -> %s",
             fmt(report["models"]["student"]["agreement_rougeL"]),
             fmt(report["models"]["baseline_student"]["agreement_rougeL"]),
             fmt(report["retained"]["quality"]), folder / "report.md")
    return report
