"""Stage completion records: a finished stage is not done again.

Each stage (train, evaluate; generate keeps its own ``corpus/_settings.json`` + ``manifest.json``
and shares ``differences`` from here) writes a record beside its output once that output is
complete: the **settings** it ran with (what changes the output if changed), the **inputs** it
read (fingerprints of earlier stages' outputs: the corpus, the student, the test prompts) and the
**outputs** it wrote (names, sizes and modification times of every file). A rerun (``Stage.done``):

- skips the stage when the outputs are still as recorded and the settings and inputs are the
  same (one log line naming the stage and its folder);
- refuses (``StageSettingsChanged``, a ValueError) when a setting changed, naming every
  difference: the output on disk would no longer describe the config (``--overwrite`` makes it
  again with the new settings);
- runs the stage again when the inputs changed (an earlier stage made a new corpus or student:
  the output is stale, nothing of the user's config is contradicted), or when the outputs are
  missing, incomplete or changed since (e.g. ``student/`` deleted, or an interrupted rerun);
- runs it again with ``overwrite``.

Records live in the run's storage (local or ``s3://``) as ``<stage folder>/_stage.json``
(``train/_stage.json``, ``eval/_stage.json``); names starting with ``_`` are left out of every
fingerprint.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from .storage import StoragePath

log = logging.getLogger(__name__)

RECORD = "_stage.json"
SHOWN = 8  # differences named in one message


class StageSettingsChanged(ValueError):
    """A finished stage's output was made with other settings than the config asks for now."""


def differences(before: dict, now: dict, prefix: str = "") -> list[str]:
    """Every ``dotted.key: old -> new`` between two nested settings dicts (sorted by key; a key
    present on one side only shows None on the other). Lists are compared whole."""
    out = []
    for key in sorted(set(before) | set(now), key=str):
        a, b = before.get(key), now.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, name + ".")
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


def fingerprint(path: StoragePath) -> list[int] | dict[str, list[int]] | None:
    """What a file or folder holds, cheaply: [size in bytes, mtime in ns] of a file; relative name
    -> [size, mtime] of every file under a folder (names starting with ``_`` or ``.`` left out);
    None when absent. Reads listings only, never file contents."""
    import pyarrow.fs as pafs

    info = path.fs.get_file_info(path.path)
    if info.type == pafs.FileType.File:
        return [info.size, info.mtime_ns]
    if info.type != pafs.FileType.Directory:
        return None
    listing = {}
    base = path.path.rstrip("/")
    for f in path.fs.get_file_info(pafs.FileSelector(base, recursive=True)):  # one listing (one S3 LIST)
        rel = f.path[len(base):].lstrip("/")
        if f.type == pafs.FileType.File and not any(part.startswith(("_", ".")) for part in rel.split("/")):
            listing[rel] = [f.size, f.mtime_ns]
    return dict(sorted(listing.items()))


@dataclass
class Stage:
    """One stage's completion record (see the module docstring).

    Args:
        name: the stage as the CLI names it (``train``, ``evaluate``).
        record: where the record is written (``<folder>/_stage.json``).
        outputs: name -> file or folder the stage writes; all must be as recorded for a skip.
        settings: the settings that shape the output (nested dicts of plain JSON values).
        inputs: fingerprints of what the stage read (plain JSON values).
    """

    name: str
    record: StoragePath
    outputs: dict[str, StoragePath]
    settings: dict
    inputs: dict = field(default_factory=dict)

    def _json(self, value):
        return json.loads(json.dumps(value))  # tuples -> lists, int keys -> str: as read back

    def done(self, overwrite: bool = False) -> bool:
        """True when the stage's output is complete and made from these settings and inputs (logged:
        the stage is skipped). False when it must run: ``overwrite``, no record, outputs missing or
        changed since, or other inputs (each logged). Raises StageSettingsChanged naming every
        changed setting when the output is complete but was made with other settings."""
        where = ", ".join(p.uri for p in self.outputs.values())
        if overwrite:
            if self.record.is_file():
                log.info("%s: --overwrite: making %s again", self.name, where)
            return False
        if not self.record.is_file():
            return False
        recorded = json.loads(self.record.read_text())
        now = {k: fingerprint(p) for k, p in self.outputs.items()}
        if recorded.get("outputs") != self._json(now):
            changed = differences(recorded.get("outputs") or {}, self._json(now))
            log.info("%s: %s changed or is incomplete since it was recorded (%s); making it again", self.name, where,
                     "; ".join(changed[:SHOWN]))
            return False
        changed = differences(recorded.get("settings") or {}, self._json(self.settings))
        if changed:
            raise StageSettingsChanged(
                f"{self.name}: {where} is finished but was made with other settings ({'; '.join(changed[:SHOWN])}"
                f"{f'; and {len(changed) - SHOWN} more' if len(changed) > SHOWN else ''}); rerun with --overwrite "
                f"to make it again with these (`raydistill {self.name} --overwrite` redoes this stage only), or "
                "restore them to keep it")
        changed = differences(recorded.get("inputs") or {}, self._json(self.inputs))
        if changed:
            log.info("%s: its inputs changed since %s was made (%s); making it again", self.name, where,
                     "; ".join(changed[:SHOWN]))
            return False
        log.info("%s: %s is complete and was made from the same inputs and settings; skipped (--overwrite "
                 "makes it again)", self.name, where)
        return True

    def forget(self) -> None:
        """Remove the record (before the stage starts rewriting its output)."""
        self.record.delete()

    def finish(self) -> None:
        """Record the stage as done: call once every output is complete."""
        self.record.write_text(json.dumps({
            "stage": self.name, "settings": self.settings, "inputs": self.inputs,
            "outputs": {k: fingerprint(p) for k, p in self.outputs.items()}}, indent=2, sort_keys=True))


def evaluate_stage(cfg) -> Stage:
    """The evaluate stage's completion record (``eval/_stage.json``).

    Settings (what evaluate itself decides): ``eval``, ``generation`` (less what only generate
    reads: ``top_k_logprobs``, error/kept/file settings), the teacher it runs (less price and API
    retry/credential settings), what scoring reads (``data.label_map``; ``data.seed`` with
    ``eval.limit``: it picks the sample; ``task_prompts.final_answer_marker``) and ``serve`` when timings come
    from the endpoint. Inputs (what earlier stages made): the files of ``student/`` and of the
    baseline (``baseline_student/``, or ``student.model`` for ``init=pretrained``, its files when
    it is a folder), the student settings, and the corpus's ``prompts/`` (the test split) and
    manifest. Output: ``eval/`` (``report.json`` is written last)."""
    from pathlib import Path

    from .config import EngineConfig
    from .corpus import MANIFEST, PROMPTS_DIR
    from .layout import baseline_location, corpus_location, eval_location, student_location
    from .storage import is_remote, storage_path

    corpus = corpus_location(cfg)
    settings = {
        # eval's GPU engine fields (on every engine config since they moved to EngineConfig) count only
        # when not at their default, so a record written before eval had them still matches
        "eval": cfg.eval.model_dump(mode="json", exclude={k for k in ("pipeline_parallel_size", "gpu_memory_utilization",
                                                                      "accelerator_type")
                                                          if getattr(cfg.eval, k) == EngineConfig.model_fields[k].default}),
        "generation": cfg.generation.model_dump(mode="json", exclude={  # what only generate reads
            "top_k_logprobs", "max_error_share", "max_error_rate", "error_window", "min_kept_share", "rows_per_file"}),
        "teacher": cfg.teacher.model_dump(mode="json", exclude={"price_per_mtok", "api_key_env", "timeout_s",
                                                                "max_retries", "retry_wait_s"}),
        "data": {"label_map": cfg.data.label_map, **({"seed": cfg.data.seed} if cfg.eval.limit else {})},
        "task_prompts": {"final_answer_marker": cfg.task_prompts.final_answer_marker},
    }
    if cfg.eval.latency_source == "serve":
        settings["serve"] = cfg.serve.model_dump(mode="json")
    if cfg.student.init == "prune":
        baseline = fingerprint(baseline_location(cfg))
    else:
        model = cfg.student.model
        local = is_remote(model) or Path(model).exists()
        baseline = {"ref": model, "files": fingerprint(storage_path(model, cfg.storage)) if local else None}
    inputs = {"student": fingerprint(student_location(cfg)), "baseline_student": baseline,
              "student_settings": cfg.student.model_dump(mode="json"),
              "prompts": fingerprint(corpus / PROMPTS_DIR), "corpus_manifest": fingerprint(corpus / MANIFEST)}
    folder = eval_location(cfg)
    return Stage("evaluate", folder / RECORD, {"eval": folder}, settings=settings, inputs=inputs)
