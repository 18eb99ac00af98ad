"""``raydistill validate``'s checks, run before anything starts (no Ray, no engine): the prompt
file(s) read as generate reads them (``read_prompts_to_check``: one local file whole, else the
first rows of the first file) and the problems that would stop a stage later (``preflight``). It
prints nothing but a note before a long conversion, and exits nothing: the CLI reports.
"""

from __future__ import annotations

import sys

from .config import Config


def read_prompts_to_check(cfg: Config):
    """(prompts, sample note) of ``cfg``'s data: one local file is read whole (line-exact errors,
    duplicate ids, split sizes); a folder of shards, a glob or an ``s3://`` path is read on the
    first file's first rows (``generate.prompts.precheck_sample``, the same check generate runs
    before its job), and the note (else ``""``) says so, for the message. ``prompts``: a pyarrow
    table with a ``split`` column.

    Raises ``data.DataError`` for a bad file, OSError for an unreadable one."""
    from .data import load_prompts
    from .generate.prompts import PRECHECK_ROWS, precheck_sample, prompt_files

    sampled = ""
    files, _ = prompt_files(cfg)
    if len(files) == 1 and not files[0].remote:
        # the one file prompt_files found (data.path may be a folder or glob around it)
        prompts = load_prompts(cfg.data.model_copy(update={"path": str(files[0].local())}), cfg.task_prompts)
    else:
        prompts = precheck_sample(cfg)
        sampled = (f" (a sample: the first {prompts.num_rows} rows of {files[0]}, 1 of {len(files)} file(s); "
                   f"up to {PRECHECK_ROWS} rows are checked)")
    return prompts, sampled


def split_counts(prompts) -> dict[str, int]:
    """Prompts per split (``train``, ``validation``, ``test``) of a table with a ``split`` column."""
    return {s: prompts.column("split").to_pylist().count(s) for s in ("train", "validation", "test")}


def preflight(cfg: Config, counts: dict[str, int] | None) -> list[str]:
    """Problems that would stop a stage later: model references, layer indices, an architecture
    init=prune cannot prune, LoRA target modules the student lacks (checked on the meta device
    when the model's config.json is at hand), split sizes."""
    from .models import (
        EMBEDDED_PREFIX,
        ModelError,
        check_prunable,
        check_reference,
        config_json,
        lora_target_problem,
        meta_model,
        resolve_model,
    )

    problems = []
    needs_files = cfg.student.init == "prune" and (cfg.student.keep_layers or cfg.train.lora.enabled)
    if needs_files and cfg.teacher.model.startswith(EMBEDDED_PREFIX) and config_json(cfg.teacher.model) is None:
        # The embedded teacher is a GGUF until its first use: convert it now (once per machine)
        # rather than skip the layer and LoRA checks.
        print(f"converting {cfg.teacher.model} once (about 40 s) to check student.keep_layers and "
              "train.lora against it ...", file=sys.stderr, flush=True)
        try:
            resolve_model(cfg.teacher.model)
        except ModelError as e:
            problems.append(f"teacher.model: {e}")
    if cfg.teacher.engine == "openai":  # an API model name, not a local model; its tokenizer is
        import os

        teacher_layers = None
        if cfg.teacher.api_key_env and not os.environ.get(cfg.teacher.api_key_env):
            problems.append(f"teacher.api_key_env: environment variable {cfg.teacher.api_key_env} is not set; "
                            "export it before generating (or set teacher.api_key_env=null for a server without a key)")
        if cfg.teacher.tokenizer:
            problem, _ = check_reference(cfg.teacher.tokenizer)
            if problem:
                problems.append(f"teacher.tokenizer: {problem}")
        from .generate.openai_engine import exact_ids_problem

        if problem := exact_ids_problem(cfg):  # logit KD only with exact token ids (asks GET /models)
            problems.append(problem)
    else:
        problem, teacher_layers = check_reference(cfg.teacher.model)
        if problem:
            problems.append(f"teacher.model: {problem}")
    if cfg.student.init == "pretrained":
        problem, _ = check_reference(cfg.student.model)
        if problem:
            problems.append(f"student.model: {problem}")
    else:
        if cfg.student.keep_layers and teacher_layers:
            bad = [i for i in cfg.student.keep_layers if not 0 <= i < teacher_layers]
            if bad:
                problems.append(f"student.keep_layers: {bad} out of range; the teacher has {teacher_layers} layers")
        wanted = cfg.student.prune.num_layers if cfg.student.prune.method == "importance" else None
        if wanted and teacher_layers and wanted > teacher_layers:
            problems.append(f"student.prune.num_layers: {wanted} layers asked for; the teacher has {teacher_layers}")
        teacher_cfg = config_json(cfg.teacher.model)
        problem = check_prunable(teacher_cfg) if teacher_cfg else None
        if problem:
            problems.append(f"student.init=prune: {problem}")
    # The student's modules are the teacher's (init=prune) or student.model's.
    student_cfg = config_json(cfg.teacher.model if cfg.student.init == "prune" else cfg.student.model)
    if cfg.train.lora.enabled and student_cfg:
        try:
            problem = lora_target_problem(meta_model(student_cfg), cfg.train.lora.target_modules)
        except ModelError as e:
            problem = str(e)
        if problem:
            problems.append(f"train.lora.target_modules: {problem}")
    if cfg.train.mlflow.enabled:
        import importlib.util

        if importlib.util.find_spec("mlflow") is None:
            problems.append("train.mlflow.enabled is true but mlflow is not installed: pip install mlflow "
                            "(or set train.mlflow.enabled=false)")
    if counts is None:  # split sizes unknown (validate read a sample of the data)
        return problems
    if counts["train"] < cfg.train.workers:
        problems.append(f"the train split has {counts['train']} prompt(s), fewer than train.workers="
                        f"{cfg.train.workers}")
    if counts[cfg.eval.split] == 0:
        problems.append(f"the {cfg.eval.split} split (eval.split) is empty; raise data.split.{cfg.eval.split}")
    return problems
