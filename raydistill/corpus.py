"""The corpus folder: the one door between generate and train/evaluate (local or ``s3://``).

``corpus/`` holds
- ``prompts/part-*.parquet``: every prompt of the run with the split it was given
  (``schema.PROMPTS_SCHEMA``: train, validation *and* test), written once by generate (its
  ``_COMPLETE`` marker says so), so that evaluate scores exactly the prompts that were held out,
  whatever ``data.*`` says later;
- ``data/part-*.parquet``: the teacher's answers kept for training (``schema.CORPUS_SCHEMA``);
- ``rejects/part-*.parquet``: answers left out, with ``reject_reason`` (``REJECTS_SCHEMA``);
- ``manifest.json``: written last; its presence marks the corpus complete.

While generation runs (or after it was interrupted) the folder also holds ``generated/`` (every
answer, written shard by shard), ``_checkpoint/`` (Ray Data's record of the prompt ids written),
``errors/`` (the rows that failed in the latest run: not checkpointed, a rerun answers them again),
``_runs/`` (one file per run) and ``_settings.json`` (what a resumed run must match); generate
removes ``generated/``, ``errors/`` and ``_checkpoint/`` once the manifest is written.

Every function takes a local path, an ``s3://`` URI or a ``storage.StoragePath``.
"""

from __future__ import annotations

import json
import os

import pyarrow as pa

from .schema import CORPUS_SCHEMA, PROMPTS_SCHEMA, SCHEMA_VERSION, SchemaError, validate
from .storage import StoragePath, storage_path

MANIFEST = "manifest.json"
PROMPTS_DIR = "prompts"
DATA_DIR = "data"
REJECTS_DIR = "rejects"
GENERATED_DIR = "generated"
COMPLETE = "_COMPLETE"

REJECTS_SCHEMA = pa.schema(list(CORPUS_SCHEMA) + [pa.field("reject_reason", pa.string(), nullable=False)],
                           metadata=CORPUS_SCHEMA.metadata)

Where = str | os.PathLike | StoragePath


def location(path: Where) -> StoragePath:
    """``path`` as a ``StoragePath`` (S3 settings from the environment unless already one)."""
    return path if isinstance(path, StoragePath) else storage_path(path)


def read_manifest(path: Where) -> dict:
    """The manifest of a finished corpus folder.

    Raises FileNotFoundError if it is absent (no finished corpus), SchemaError if the corpus was
    written with another schema version (regenerate it)."""
    loc = location(path)
    file = loc / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(f"no finished corpus at {loc} ({MANIFEST} missing): run `raydistill generate` "
                                "(an interrupted generation continues where it stopped)")
    info = json.loads(file.read_text())
    if info.get("schema_version") != SCHEMA_VERSION:
        raise SchemaError(f"corpus at {loc} has schema version {info.get('schema_version')}, this raydistill "
                          f"reads version {SCHEMA_VERSION}: rerun `raydistill generate --overwrite`")
    return info


def _read_tables(loc: StoragePath, files: list[str], columns: list[str] | None = None) -> list[pa.Table]:
    import pyarrow.parquet as pq

    missing = [f for f in files if not (loc / f).is_file()]
    if missing:
        raise FileNotFoundError(f"corpus at {loc} lacks shard(s) listed in its manifest: {missing[:10]}")
    return [pq.read_table((loc / f).path, filesystem=loc.fs, columns=columns) for f in files]


def read_corpus(path: Where) -> tuple[pa.Table, dict]:
    """Read a finished corpus's kept rows into memory: (table with ``CORPUS_SCHEMA``, manifest).

    Raises FileNotFoundError if it is absent or incomplete, SchemaError if a shard breaks the schema.
    """
    loc = location(path)
    info = read_manifest(loc)
    tables = _read_tables(loc, info["shards"])
    table = pa.concat_tables(tables) if tables else CORPUS_SCHEMA.empty_table()
    validate(table, CORPUS_SCHEMA, str(loc))
    # Only the schema's (type-checked) columns: an extra column could hold pickled objects, which
    # pyarrow unpickles (runs) on conversion to Python when ray.data is imported.
    return table.select(CORPUS_SCHEMA.names), info


def corpus_ids(path: Where, split: str) -> set[str]:
    """Prompt ids of the kept corpus rows (``data/``) in ``split``; reads two columns only.

    Raises FileNotFoundError without a finished corpus."""
    loc = location(path)
    ids: set[str] = set()
    for t in _read_tables(loc, read_manifest(loc).get("shards", []), columns=["prompt_id", "split"]):
        ids.update(p for p, s in zip(t.column("prompt_id").to_pylist(), t.column("split").to_pylist()) if s == split)
    return ids


def write_prompts(path: Where, prompts: pa.Table) -> None:
    """Write every prompt of the run with its split (``PROMPTS_SCHEMA``) to ``path/prompts/`` in one
    shard and mark it complete (generate writes it with Ray Data, shard by shard; this is for small
    tables and tests)."""
    import pyarrow.parquet as pq

    loc = location(path) / PROMPTS_DIR
    validate(prompts, PROMPTS_SCHEMA, "prompts")
    loc.mkdir()
    pq.write_table(prompts.select(PROMPTS_SCHEMA.names), (loc / "part-00000.parquet").path, filesystem=loc.fs)
    splits = prompts.column("split").to_pylist()
    (loc / COMPLETE).write_text(json.dumps({"rows": prompts.num_rows,
                                            "by_split": {s: splits.count(s) for s in ("train", "validation", "test")}}))


def prompts_complete(path: Where) -> bool:
    """True when ``path/prompts/`` was written completely."""
    return (location(path) / PROMPTS_DIR / COMPLETE).is_file()


def read_prompts(path: Where, splits: tuple[str, ...] | None = None) -> pa.Table:
    """The prompts written with the corpus (optionally only ``splits``) into memory.

    For evaluation's held-out prompts; the whole prompt set of a large run belongs in Ray Data
    (``ray.data.read_parquet`` of ``prompts/``). With ``splits`` only those rows are read (the split
    filter is pushed into the parquet scan), and the other splits are scanned for their
    ``prompt_id`` and ``split`` columns only, batch by batch, to check that no read id is in another
    split: the driver holds the read rows, never the whole prompt set. Raises FileNotFoundError without
    a finished corpus or when ``prompts/`` is missing, SchemaError when held-out prompts share an id
    with the train prompts.
    """
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    loc = location(path)
    read_manifest(loc)
    folder = loc / PROMPTS_DIR
    if not prompts_complete(loc):
        raise FileNotFoundError(f"corpus at {loc} has no complete {PROMPTS_DIR}/ (the split of the run): rerun "
                                "`raydistill generate --overwrite`")
    files = [f.path for f in folder.files(".parquet")]
    if not files:
        table = PROMPTS_SCHEMA.empty_table()
        return table if splits is None else table.filter(pc.is_in(table.column("split"),
                                                                   value_set=pa.array(list(splits), pa.string())))
    dataset = pads.dataset(files, format="parquet", filesystem=folder.fs)
    if not {"prompt_id", "split"} <= set(dataset.schema.names):  # the missing columns, named
        validate(dataset.schema.empty_table(), PROMPTS_SCHEMA, str(folder))
    wanted = None if splits is None else pc.field("split").isin(list(splits))
    table = dataset.to_table(filter=wanted)
    validate(table, PROMPTS_SCHEMA, str(folder))
    table = table.select(PROMPTS_SCHEMA.names).cast(PROMPTS_SCHEMA)
    check_disjoint(table, str(folder))
    if wanted is not None:
        ids = dict(zip(table.column("prompt_id").to_pylist(), table.column("split").to_pylist()))
        clashes = []
        for batch in dataset.to_batches(columns=["prompt_id", "split"], filter=~wanted):
            clashes += [f"{p} ({ids[p]} and {s})" for p, s in zip(batch.column("prompt_id").to_pylist(),
                                                                 batch.column("split").to_pylist()) if p in ids]
        if clashes:
            raise SchemaError(f"{folder}: {len(clashes)} prompt id(s) appear in two splits, so held-out prompts "
                              f"would be trained on: {', '.join(clashes[:10])}")
    return table


def check_disjoint(prompts: pa.Table, source: str) -> None:
    """Raise SchemaError if a prompt id sits in more than one split (held-out prompts must be unseen)."""
    seen: dict[str, str] = {}
    clashes = []
    for pid, split in zip(prompts.column("prompt_id").to_pylist(), prompts.column("split").to_pylist()):
        if pid in seen and seen[pid] != split:
            clashes.append(f"{pid} ({seen[pid]} and {split})")
        seen.setdefault(pid, split)
    if clashes:
        raise SchemaError(f"{source}: {len(clashes)} prompt id(s) appear in two splits, so held-out prompts "
                          f"would be trained on: {', '.join(clashes[:10])}")


def order_keys(prompt_ids, seed: int) -> pa.Array:
    """The sort key of each prompt id, for an order that depends on the rows alone (train's examples
    with ``train.seed``, evaluate's prompts with ``data.seed``): the first 8 bytes of
    ``sha256(f"{seed}:{prompt_id}")`` as a signed int64 (uniform over the int64 range). A pure
    function of (seed, id): the rows' order does not depend on the corpus's files, their
    listing or which Ray task read them."""
    import hashlib

    return pa.array([int.from_bytes(hashlib.sha256(f"{seed}:{pid}".encode()).digest()[:8], "big", signed=True)
                     for pid in prompt_ids], pa.int64())
