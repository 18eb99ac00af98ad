"""The corpus folder: the one door between generate and train/evaluate.

``corpus/`` holds
- ``data/part-*.parquet``: the teacher's answers to the train and validation prompts
  (``schema.CORPUS_SCHEMA``);
- ``prompts.parquet``: every prompt of the run with the split it was given
  (``schema.PROMPTS_SCHEMA``: train, validation *and* test), written once by generate, so that
  evaluate scores exactly the prompts that were held out, whatever ``data.*`` says later;
- ``manifest.json``: written last; its presence marks the corpus complete.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from .schema import CORPUS_SCHEMA, PROMPTS_SCHEMA, SchemaError, validate

MANIFEST = "manifest.json"
PROMPTS_FILE = "prompts.parquet"


def read_manifest(path: Path) -> dict:
    """The manifest of a finished corpus folder. Raises FileNotFoundError if it is absent."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"no finished corpus at {path} ({MANIFEST} missing): run `raydistill generate` first")
    return json.loads(manifest.read_text())


def read_corpus(path: Path) -> tuple[pa.Table, dict]:
    """Read a finished corpus folder: (table with ``CORPUS_SCHEMA``, manifest dict).

    Raises FileNotFoundError if it is absent or incomplete, SchemaError if a shard breaks the schema.
    """
    import pyarrow.parquet as pq

    path = Path(path)
    info = read_manifest(path)
    shards = info["shards"]
    missing = [s for s in shards if not (path / s).is_file()]
    if missing:
        raise FileNotFoundError(f"corpus at {path} lacks shard(s) listed in its manifest: {missing}")
    tables = [pq.read_table(path / s) for s in shards]
    table = pa.concat_tables(tables) if tables else CORPUS_SCHEMA.empty_table()
    validate(table, CORPUS_SCHEMA, str(path))
    return table, info


def corpus_ids(path: Path, split: str) -> set[str]:
    """Prompt ids of the corpus rows (``data/part-*.parquet``) in ``split``; reads two columns only.

    Raises FileNotFoundError without a finished corpus."""
    import pyarrow.parquet as pq

    path = Path(path)
    ids: set[str] = set()
    for shard in read_manifest(path).get("shards", []):
        if (path / shard).is_file():
            t = pq.read_table(path / shard, columns=["prompt_id", "split"])
            ids.update(p for p, s in zip(t.column("prompt_id").to_pylist(), t.column("split").to_pylist())
                       if s == split)
    return ids


def write_prompts(path: Path, prompts: pa.Table) -> None:
    """Write every prompt of the run with its split (``PROMPTS_SCHEMA``) to ``path/prompts.parquet``."""
    import pyarrow.parquet as pq

    validate(prompts, PROMPTS_SCHEMA, "prompts")
    pq.write_table(prompts.select(PROMPTS_SCHEMA.names), Path(path) / PROMPTS_FILE)


def read_prompts(path: Path, splits: tuple[str, ...] | None = None) -> pa.Table:
    """The prompts written with the corpus (optionally only ``splits``), in their original order.

    Raises FileNotFoundError when the corpus predates this file (regenerate it) and SchemaError
    when the held-out prompts share an id with the train prompts.
    """
    import pyarrow.parquet as pq

    path = Path(path)
    read_manifest(path)
    file = path / PROMPTS_FILE
    if not file.is_file():
        raise FileNotFoundError(f"corpus at {path} has no {PROMPTS_FILE} (the split of the run); it was made by "
                                "an older raydistill: rerun `raydistill generate`")
    table = pq.read_table(file)
    validate(table, PROMPTS_SCHEMA, str(file))
    check_disjoint(table, str(file))
    if splits is not None:
        from .data import select_split

        table = select_split(table, splits)
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
