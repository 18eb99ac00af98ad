"""Training checkpoints in the run's storage (local or ``s3://``): find, read, keep.

Ray Train writes each reported checkpoint to ``<output_dir>/train/ray/checkpoint_<time>/``. A
raydistill checkpoint holds ``state.pt`` (the trainable weights: a LoRA run's adapters only, the
optimizer state, step, metric history, every rank's RNG state; read with ``weights_only=True``), ``history.json`` (the metric history alone), ``hf/`` on the final one (the exported student) and ``META_FILE``, written last: the
step, whether it is final, the validation loss when one was measured, and every file's size (the
final one also: ``exported_step``, the step whose weights are in ``hf/``, and ``stopped_early``).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ..storage import StoragePath, storage_path

STATE_FILE = "state.pt"
HISTORY_FILE = "history.json"  # the metric history (one record per step), small: what the driver reads
HF_SUBDIR = "hf"
META_FILE = "raydistill_checkpoint.json"


def _loc(folder: str | os.PathLike | StoragePath) -> StoragePath:
    return folder if isinstance(folder, StoragePath) else storage_path(folder)


def write_meta(folder: Path, step: int, final: bool, val_loss: float | None = None, **extra) -> None:
    """Write ``META_FILE`` into a local checkpoint folder, last (it lists every other file).
    ``extra``: more JSON fields (the final checkpoint's ``exported_step``, ``stopped_early``)."""
    files = {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
    (folder / META_FILE).write_text(json.dumps({"step": step, "final": final, "val_loss": val_loss, **extra,
                                                "files": files}))


def checkpoint_dirs(ray_dir: str | os.PathLike | StoragePath) -> list[StoragePath]:
    """The checkpoint folders in Ray Train's run folder (not its checkpoint_manager_snapshot.json)."""
    import pyarrow.fs as pafs

    loc = _loc(ray_dir)
    if not loc.is_dir():
        return []
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=False))
    return sorted((loc / i.base_name for i in infos
                   if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")),
                  key=lambda p: p.path)


def read_meta(folder: str | os.PathLike | StoragePath) -> dict | None:
    """A checkpoint's ``META_FILE`` when the checkpoint is complete (every listed file present with
    its listed size), else None."""
    import pyarrow.fs as pafs

    loc = _loc(folder)
    try:
        meta = json.loads((loc / META_FILE).read_text())
        listed = meta["files"]
        infos = loc.fs.get_file_info([(loc / rel).path for rel in listed])
    except (OSError, ValueError, KeyError):
        return None
    for info, size in zip(infos, listed.values()):
        if info.type != pafs.FileType.File or info.size != size:
            return None
    return meta


def checkpoint_step(folder: str | os.PathLike | StoragePath) -> int:
    """The step recorded in one checkpoint folder (-1 when it has no readable record)."""
    try:
        return int(json.loads((_loc(folder) / META_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


def latest_checkpoint(ray_dir: str | os.PathLike | StoragePath) -> tuple[StoragePath, dict] | None:
    """The complete checkpoint with the highest step under ``ray_dir`` (Ray Train's run folder),
    as (folder, its ``META_FILE`` contents), or None.

    The folder is scanned rather than Ray's own record: Ray registers a checkpoint only when its
    controller next polls the workers, so a run interrupted between the upload and that poll would
    otherwise resume one checkpoint early and redo a step.
    """
    best: tuple[tuple, StoragePath, dict] | None = None
    for d in checkpoint_dirs(ray_dir):
        meta = read_meta(d)
        if meta is None:
            continue
        key = (meta["step"], bool(meta.get("final")), d.name)
        if best is None or key > best[0]:
            best = (key, d, meta)
    return (best[1], best[2]) if best else None


def prune(ray_dir: str | os.PathLike | StoragePath, keep: int) -> list[str]:
    """Delete all but the ``keep`` checkpoints with the highest steps and the one with the lowest
    validation loss; incomplete folders are left alone (an upload may be in progress). Returns the
    names deleted."""
    metas = [(d, read_meta(d)) for d in checkpoint_dirs(ray_dir)]
    complete = [(d, m) for d, m in metas if m is not None]
    if not complete:
        return []
    by_step = sorted(complete, key=lambda x: (x[1]["step"], bool(x[1].get("final")), x[0].name))
    kept = {d.name for d, _ in by_step[-keep:]}
    scored = [(m["val_loss"], d.name) for d, m in complete if m.get("val_loss") is not None]
    if scored:
        kept.add(min(scored)[1])
    deleted = []
    for d, m in metas:
        if d.name in kept or m is None:  # incomplete: possibly being written; the end of the run removes it
            continue
        d.delete()
        deleted.append(d.name)
    return deleted


def best_checkpoint(ray_dir: str | os.PathLike | StoragePath) -> tuple[StoragePath, dict] | None:
    """The complete checkpoint with the lowest validation loss (None without any)."""
    scored = [(m["val_loss"], d.name, d, m) for d in checkpoint_dirs(ray_dir)
              if (m := read_meta(d)) is not None and m.get("val_loss") is not None]
    return (min(scored)[2], min(scored)[3]) if scored else None


def download(folder: StoragePath, dest: Path) -> Path:
    """Copy a checkpoint (or any folder) from storage into the local folder ``dest``; a local
    ``folder`` is returned as it is."""
    if not folder.remote:
        return folder.local()
    import pyarrow.fs as pafs

    dest.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(folder.path, str(dest), source_filesystem=folder.fs,
                    destination_filesystem=pafs.LocalFileSystem())
    return dest


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read safely (it holds more than tensors and plain values)."""


def _safe_load(path: Path, shown: str) -> dict:
    import pickle

    import torch

    try:
        # weights_only: tensors, dicts, lists, numbers and strings only; an object whose unpickling
        # would run code (written by whoever can write the bucket) is refused, never built
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{shown}: refused: the checkpoint holds objects other than tensors and plain values, "
                              f"and loading them could run code ({str(e).splitlines()[0]}); delete the checkpoint "
                              "folder to start afresh") from None


def load_state(folder: StoragePath) -> dict:
    """``state.pt`` of a checkpoint (trainable weights, optimizer, step, history, RNG states), on CPU.

    Read with ``torch.load(weights_only=True)``: nothing in it runs code. Raises CheckpointError
    (naming the file) for a file holding any other object."""
    folder = _loc(folder)
    shown = (folder / STATE_FILE).uri
    if not folder.remote:
        return _safe_load(folder.local() / STATE_FILE, shown)
    with tempfile.TemporaryDirectory() as d:
        local = Path(d) / STATE_FILE
        local.write_bytes((folder / STATE_FILE).read_bytes())
        return _safe_load(local, shown)
