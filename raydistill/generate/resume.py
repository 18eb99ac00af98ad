"""What lets the generate stage resume, and its error: the working folders of ``corpus/``, the
settings every run adding rows to one corpus must share, the history of runs, and Ray Data's
checkpoint bookkeeping (committed rows, interrupted commits).

It reads and writes small files of the corpus folder only; it runs no Ray Data job of its own
beyond counting rows from parquet footers, and holds none of the stage's steps.
"""

from __future__ import annotations

import json

from ..config import Config
from ..corpus import COMPLETE, GENERATED_DIR, PROMPTS_DIR
from ..storage import StoragePath

CHECKPOINT_DIR = "_checkpoint"
ERRORS_DIR = "errors"  # this run's failed rows: outside the checkpoint, so a rerun answers them again
RUNS_DIR = "_runs"
SETTINGS = "_settings.json"
#: generation settings that decide when to stop or fail and how files are cut, not what is generated
_CHECKS_ONLY = {"max_error_share", "max_error_rate", "error_window", "min_kept_share", "rows_per_file"}


class GenerationError(ValueError):
    """Generation cannot go on: too many failed rows, settings changed under a resumed corpus,
    duplicate prompt ids. Rows already written are kept."""


def shared_settings(cfg: Config, teacher_tokenizer: str | None) -> dict:
    """What every run adding rows to one corpus must share (``data.label_map`` only affects
    scoring; ``filter`` is compared for a finished corpus only: an unfinished one filters again)."""
    return {"teacher": cfg.teacher.model, "engine": cfg.teacher.engine, "teacher_tokenizer": teacher_tokenizer,
            "generation": cfg.generation.model_dump(exclude=_CHECKS_ONLY),
            "data": cfg.data.model_dump(mode="json", exclude={"label_map"}),
            "task_prompts": cfg.task_prompts.model_dump(mode="json"), "filter": cfg.filter.model_dump()}


def check_settings(out: StoragePath, settings: dict, finished: bool = False) -> None:
    """Refuse to continue (or to reuse, when ``finished``) a corpus made with other settings."""
    file = out / SETTINGS
    if not file.is_file():
        if not finished:
            file.write_text(json.dumps(settings, indent=2, sort_keys=True))
        return
    before = json.loads(file.read_text())
    if not finished:
        before.pop("filter", None)
        settings = {k: v for k, v in settings.items() if k != "filter"}
    elif "filter" not in before:
        before["filter"] = settings["filter"]
    from ..stages import differences

    changed = differences(before, settings)
    if changed and finished:
        raise GenerationError(f"{out} is a finished corpus made with other settings ({'; '.join(changed[:8])}); "
                              "rerun with --overwrite to generate it again with these, or restore them to use it")
    if changed:
        raise GenerationError(f"{out} holds an unfinished generation made with other settings ({'; '.join(changed[:8])}); "
                              "rerun with those settings to continue it, or with --overwrite to start again")


def run_history(out: StoragePath, rows_now: int) -> list[dict]:
    runs = sorted((json.loads(f.read_text()) for f in (out / RUNS_DIR).files(".json")), key=lambda r: r["started"])
    for run, nxt in zip(runs, runs[1:] + [None]):
        run["rows_added"] = (nxt["rows_before"] if nxt else rows_now) - run["rows_before"]
    return runs


def cleanup(out: StoragePath) -> None:
    for name in (GENERATED_DIR, CHECKPOINT_DIR, ERRORS_DIR):
        (out / name).delete()


def count_rows(folder: StoragePath) -> int:
    """Rows in the parquet files under ``folder`` (from their footers, in Ray Data); 0 if none."""
    import ray

    files = [f.uri for f in folder.files(".parquet")]
    return ray.data.read_parquet(files, filesystem=folder.fs).count() if files else 0


def prompt_count(out: StoragePath) -> int:
    """Train + validation prompts of the corpus (``prompts/_COMPLETE``)."""
    by_split = json.loads((out / PROMPTS_DIR / COMPLETE).read_text())["by_split"]
    return by_split["train"] + by_split["validation"]


def settle_checkpoints(out: StoragePath) -> None:
    """Finish commits a kill interrupted. Ray Data commits a shard by renaming its checkpoint file
    from ``X.pending.parquet`` to ``X.parquet``; on S3 a rename is copy + delete, so a kill between
    the two leaves both, and Ray's recovery would then delete the shard's data while its ids stay
    marked done. Both present = committed: drop the pending file, as the commit would have."""
    folder = out / CHECKPOINT_DIR
    names = {f.name for f in folder.files(".parquet")}
    for f in folder.files(".pending.parquet"):
        if f.name.replace(".pending.parquet", ".parquet") in names:
            f.delete()


def committed_rows(out: StoragePath) -> int:
    """Rows whose shard is committed (Ray Data's checkpoint files, pending ones left out),
    counted by Ray Data from the parquet footers."""
    import ray

    files = [f.uri for f in (out / CHECKPOINT_DIR).files(".parquet") if not f.name.endswith(".pending.parquet")]
    return ray.data.read_parquet(files, filesystem=out.fs).count() if files else 0
