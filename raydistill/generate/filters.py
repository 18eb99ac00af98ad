"""Which teacher answers stay out of training, and why.

Each generated row (``common.GENERATED_SCHEMA``) gets at most one reject reason: the first of
``REASONS`` that applies under ``cfg.filter`` (``config.FilterConfig``):

- ``error``: the engine failed on the row (``finish_reason`` "error" or ``error`` set); always on;
- ``empty``: the response is null or whitespace (``filter.empty``);
- ``truncated``: ``finish_reason`` "length", cut at ``max_new_tokens`` or ``max_model_len``
  (``filter.truncated``);
- ``no_final_answer``: a math, QA or NLI answer with no final answer (``tasks.final_answer`` with
  ``task_prompts.final_answer_marker``: math a stated number, QA the text after the marker, NLI a
  label); summarization and conversation answers have none and are never rejected for it
  (``filter.no_final_answer``);
- ``reference_mismatch``: the final answer disagrees with the row's reference
  (``tasks.agrees_with_reference``, the scorers' rules); rows without a reference, or whose
  reference cannot be read, are kept (``filter.match_reference``);
- ``duplicate``: the same messages and response as a row with a smaller ``prompt_id`` (string
  order); the smallest is kept (``filter.duplicates``). Found over the whole dataset by
  ``duplicate_ids``; ``reject_reasons`` marks the ids it is given.

``reject_reasons`` is a pure function of one pyarrow batch, for ``Dataset.map_batches``; the
dataset-wide duplicate search (``duplicate_ids``) runs in Ray Data and returns only the ids.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from typing import TYPE_CHECKING

import pyarrow as pa

from ..config import Config
from ..tasks import FINAL_ANSWER_TASKS, agrees_with_reference, final_answer

if TYPE_CHECKING:
    import ray.data

#: Reject reasons in order of precedence: a row gets the first that applies.
REASONS = ("error", "empty", "truncated", "no_final_answer", "reference_mismatch", "duplicate")

_NEEDS = ("prompt_id", "task", "reference", "response", "finish_reason", "error")
_KEY = "__dup_key"


def reject_reasons(table: pa.Table, cfg: Config, duplicates: Collection[str] | None = None) -> pa.Array:
    """The reject reason of each row of ``table``, or null for a row kept for training.

    Args:
        table: generated rows (``GENERATED_SCHEMA`` columns; it needs ``prompt_id``, ``task``,
            ``reference``, ``response``, ``finish_reason`` and ``error``; others are ignored).
        cfg: the run config: ``cfg.filter`` switches the reasons (``error`` is always on),
            ``cfg.task_prompts.final_answer_marker`` precedes final answers, ``cfg.data.label_map``
            maps NLI references.
        duplicates: prompt ids to mark ``duplicate`` (from ``duplicate_ids``; used only when
            ``filter.duplicates``); a row that an earlier reason rejects keeps that reason.
    Returns:
        A string array of ``table.num_rows`` values, each one of ``REASONS`` or null.
    Raises:
        ValueError: naming the columns ``table`` lacks.
    """
    missing = [c for c in _NEEDS if c not in table.column_names]
    if missing:
        raise ValueError(f"reject_reasons: the generated rows lack column(s) {', '.join(missing)} "
                         f"(has {', '.join(table.column_names)})")
    f = cfg.filter
    marker = cfg.task_prompts.final_answer_marker
    label_map = cfg.data.label_map
    dups = set(duplicates or ()) if f.duplicates else set()
    cols = {c: table.column(c).to_pylist() for c in _NEEDS}
    out: list[str | None] = []
    for pid, task, ref, resp, finish, err in zip(*(cols[c] for c in _NEEDS)):
        if finish == "error" or err is not None:
            out.append("error")
        elif f.empty and not (resp or "").strip():
            out.append("empty")
        elif f.truncated and finish == "length":
            out.append("truncated")
        elif f.no_final_answer and task in FINAL_ANSWER_TASKS and final_answer(task, resp, marker) is None:
            out.append("no_final_answer")
        elif f.match_reference and agrees_with_reference(task, resp, ref, marker, label_map=label_map) is False:
            out.append("reference_mismatch")
        elif pid in dups:
            out.append("duplicate")
        else:
            out.append(None)
    return pa.array(out, pa.string())


def _dup_keys(batch: pa.Table) -> pa.Table:
    """(prompt_id, key): key = a hash of the row's messages and response (JSON, UTF-8)."""
    missing = [c for c in ("prompt_id", "messages", "response") if c not in batch.column_names]
    if missing:
        raise ValueError(f"duplicate_ids: the generated rows lack column(s) {', '.join(missing)} "
                         f"(has {', '.join(batch.column_names)})")
    keys = []
    for messages, response in zip(batch.column("messages").to_pylist(), batch.column("response").to_pylist()):
        text = json.dumps([messages, response], ensure_ascii=False, separators=(",", ":"))
        keys.append(hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest())
    return pa.table({"prompt_id": batch.column("prompt_id").cast(pa.string()), _KEY: pa.array(keys, pa.string())})


def _all_but_smallest(groups: pa.Table) -> pa.Table:
    """From one row per key (``n``, ``keep`` = smallest id, ``ids``): every id but ``keep``."""
    import pyarrow.compute as pc

    groups = groups.filter(pc.greater(groups.column("n"), 1))
    ids = groups.column("ids").combine_chunks()
    flat = pc.list_flatten(ids)
    keep = groups.column("keep").combine_chunks().take(pc.list_parent_indices(ids))
    return pa.table({"prompt_id": flat.filter(pc.not_equal(flat, keep)).cast(pa.string())})


def duplicate_ids(ds: "ray.data.Dataset", partitions: int | None = None) -> set[str]:
    """Prompt ids of the exact duplicates in ``ds``: rows whose ``messages`` and ``response`` equal
    those of a row with a smaller ``prompt_id`` (string order). The smallest id of each group is
    not returned (it is kept).

    Runs in Ray Data: a hash key column (blake2b of the messages and response, ``map_batches``),
    ``groupby(key).aggregate`` (count, smallest id, the ids), then every id but the smallest of each
    group of two or more rows (vectorized ``map_batches``); the driver receives only the duplicate
    ids. ``ds`` needs ``prompt_id``, ``messages`` and ``response`` (``GENERATED_SCHEMA``). Pass the
    rows the other reasons keep (null ``reject_reasons``), so that a row is never a duplicate of a
    rejected one. ``ds`` is executed here: pass written or materialized rows, not a lazy dataset
    that still runs the engine. Raises ValueError (from the Ray task) naming the columns ``ds`` lacks.
    ``partitions``: the groupby's hash partitions (None: Ray's default of 200;
    ``runtime.shuffle_partitions`` sizes them from the row count).
    """
    from ray.data.aggregate import AsList, Count, Min

    keyed = ds.map_batches(_dup_keys, batch_format="pyarrow")
    groups = keyed.groupby(_KEY, num_partitions=partitions).aggregate(Count(alias_name="n"), Min("prompt_id", alias_name="keep"),
                                          AsList("prompt_id", alias_name="ids"))
    extra = groups.map_batches(_all_but_smallest, batch_format="pyarrow")
    return {pid for batch in extra.iter_batches(batch_format="pyarrow")
            for pid in batch.column("prompt_id").to_pylist()}
