"""Train examples: the corpus tokenized with the student's tokenizer and chat template, in Ray Data.

``write_examples`` reads ``corpus/data/`` with ``ray.data.read_parquet`` (local or ``s3://``),
tokenizes it in Ray Data tasks (``map_batches``), optionally packs short examples together, and
writes one parquet folder per split under ``train/examples/<split>/`` (``EXAMPLE_SCHEMA``). The
driver receives only counts (``example_counts``); Ray Train workers read their own shard of
``train/examples/train/`` through ``ray.train.get_dataset_shard``, and the whole of
``train/examples/validation/`` with ``read_trained_rows``.

One example row (all lists of the same row have matching lengths)::

    input_ids      (seq,) int32       prompt ids (chat template) then answer ids
    labels         (seq,) int32       -100 on prompt and padding positions, the answer ids elsewhere
    position_ids   (seq,) int32       0, 1, ... per packed example (restarts where the next one begins)
    kd_positions   (n_kd,) int32      sequence indices whose label has a teacher distribution
    topk_ids       (n_kd, k) int32    the teacher's top-k token ids at those positions (logit KD only)
    topk_logprobs  (n_kd, k) float32  their natural-log probabilities (temperature 1)
    n_labels       int32              label positions (labels != -100)
    drop_reason    string             null = trained; error | truncated | too_long (the row is left out)

Alignment: ``topk_ids[j]`` is the teacher's distribution over the token at sequence position
``kd_positions[j]``, i.e. what the student predicts from its logits at ``kd_positions[j] - 1``.
"""

from __future__ import annotations

import functools
from typing import Any

import pyarrow as pa

from ..config import Config
from ..corpus import order_keys
from .prefetch import prefetched  # noqa: F401 - re-exported: the loop's prefetch, with collate

IGNORE_INDEX = -100  # label of positions no loss reads (the PyTorch / transformers convention)
TEACHER_IDS, RETOKENIZED = "teacher_token_ids", "retokenized_text"
DROP_REASONS = ("error", "truncated", "too_long")
COMPLETE = "_COMPLETE"  # written into an examples folder once all its files are

EXAMPLE_SCHEMA = pa.schema([
    pa.field("prompt_id", pa.string()),
    pa.field("input_ids", pa.list_(pa.int32())),
    pa.field("labels", pa.list_(pa.int32())),
    pa.field("position_ids", pa.list_(pa.int32())),
    pa.field("kd_positions", pa.list_(pa.int32())),
    pa.field("topk_ids", pa.list_(pa.list_(pa.int32()))),
    pa.field("topk_logprobs", pa.list_(pa.list_(pa.float32()))),
    pa.field("n_labels", pa.int32()),
    pa.field("truncated", pa.bool_()),  # the teacher's answer was cut at its token limit (finish_reason length)
    pa.field("drop_reason", pa.string()),
])

CORPUS_COLUMNS = ["prompt_id", "split", "messages", "response", "response_token_ids", "finish_reason", "error",
                  "top_logprobs_ids", "top_logprobs"]


def build_example(tokenizer, messages: list[dict], response: str, finish_reason: str,
                  response_ids: list[int] | None, max_len: int, *, eot_ids: list[int],
                  stop_ids: set[int] = frozenset(), topk_ids: list[list[int]] | None = None,
                  topk_logprobs: list[list[float]] | None = None) -> dict[str, list] | None:
    """Chat-format one (prompt, teacher answer) pair.

    Args:
        tokenizer: the student's tokenizer (with a chat template).
        messages: the prompt's chat messages.
        response: the teacher's answer text; used when ``response_ids`` is None.
        finish_reason: ``stop`` (the answer ended by itself) or ``length`` (cut at the token limit).
        response_ids: the teacher's own generated ids (same token-id space as ``tokenizer``), or
            None to tokenize ``response`` again (``chat.text_ids``: special-token spellings stay text).
        max_len: tokens kept (prompt + answer), cut from the right.
        eot_ids: what the template writes after an answer (``chat.end_of_turn_ids``).
        stop_ids: ids that ended generation; a trailing one in ``response_ids`` is replaced by ``eot_ids``.
        topk_ids, topk_logprobs: the teacher's top-k per generated token, (len(response_ids), k)
            (the corpus columns ``top_logprobs_ids`` / ``top_logprobs``); only with ``response_ids``.
    Returns:
        ``input_ids`` and ``labels`` (same length ≤ max_len): prompt ids (``chat.prompt_ids``) carry
        -100, answer ids carry their ids. A ``stop`` answer ends with ``eot_ids``; a ``length``
        answer ends with its last token (no end of turn: the student must not learn to stop
        there). ``kd_positions`` / ``topk_ids`` / ``topk_logprobs``: the answer positions that have
        a teacher distribution (every generated token kept; where a stop token is replaced by
        ``eot_ids``, the first end-of-turn id keeps the stop token's distribution when it is that
        token, and the template's extra ids have none). None when the prompt alone fills
        ``max_len`` (nothing to learn).
    """
    from ..chat import prompt_ids, text_ids

    prompt = prompt_ids(tokenizer, messages)
    if len(prompt) >= max_len - 1:
        return None
    kd_ids: list[list[int]] = []
    kd_lps: list[list[float]] = []
    if response_ids is not None:
        answer = list(response_ids)
        n_dist = len(answer)  # generated tokens with a teacher distribution
        if finish_reason == "stop" and answer and answer[-1] in stop_ids:
            stop = answer.pop()
            # the stop token's distribution stays only where the template writes that same token
            n_dist = len(answer) + (1 if eot_ids and eot_ids[0] == stop else 0)
        if topk_ids is not None and topk_logprobs is not None:
            kd_ids = [list(x) for x in topk_ids[:n_dist]]
            kd_lps = [list(x) for x in topk_logprobs[:n_dist]]
    else:
        answer = text_ids(tokenizer, response)
    if finish_reason == "stop":
        answer += list(eot_ids)
    ids = (prompt + answer)[:max_len]
    labels = ([IGNORE_INDEX] * len(prompt) + answer)[:max_len]
    n_kd = min(len(kd_ids), len(ids) - len(prompt))
    return {"input_ids": ids, "labels": labels, "position_ids": list(range(len(ids))),
            "kd_positions": list(range(len(prompt), len(prompt) + n_kd)),
            "topk_ids": kd_ids[:n_kd], "topk_logprobs": kd_lps[:n_kd]}


def pack(examples: list[dict[str, list]], max_len: int) -> list[dict[str, list]]:
    """Greedy first-fit packing of examples (in order) into rows of at most ``max_len`` tokens.

    Each example keeps its own ``position_ids`` (restarting at 0): transformers reads packed
    sequences from the position ids when no attention mask is given and lets each example attend
    only to itself (``masking_utils.find_packed_sequence_indices``). ``kd_positions`` are shifted
    to the row. Returns the packed rows (fewer or equal in number)."""
    rows: list[dict[str, list]] = []
    for ex in examples:
        n = len(ex["input_ids"])
        target = next((r for r in rows if len(r["input_ids"]) + n <= max_len), None)
        if target is None:
            rows.append({k: list(v) if isinstance(v, list) else v for k, v in ex.items()})
            continue
        offset = len(target["input_ids"])
        for key in ("input_ids", "labels", "position_ids", "topk_ids", "topk_logprobs"):
            target[key] += ex[key]
        target["kd_positions"] += [p + offset for p in ex["kd_positions"]]
        if "prompt_id" in target:
            target["prompt_id"] = f"{target['prompt_id']},{ex['prompt_id']}"
        if "truncated" in target:
            target["truncated"] = bool(target["truncated"] or ex["truncated"])
    return rows


@functools.lru_cache(maxsize=4)
def _tokenizer(folder: str):
    """The tokenizer of the model reference ``folder`` (its tokenizer files only: an ``s3://`` or hub
    student is fetched where this task runs, not read from the driver's disk)."""
    from transformers import AutoTokenizer

    from ..models import model_metadata

    return AutoTokenizer.from_pretrained(model_metadata(folder))


def _check_topk(r: dict) -> None:
    """Raise SchemaError (naming the row) when a corpus row's top-k columns do not pair one row per
    answer token id (``schema.topk_problem``): logit KD would shift its targets against the ids."""
    from ..schema import SchemaError, topk_problem

    ids, top = r["response_token_ids"] or [], r["top_logprobs_ids"]
    problem = (topk_problem(r["prompt_id"], ids, top, r["top_logprobs"]) if top is not None
               else f"row {r['prompt_id']}: {len(ids)} answer token ids but no top-k ids" if ids else None)
    if problem:
        raise SchemaError(f"train.loss=logit_kd: the corpus's {problem}; the teacher's top-k logprobs cannot be "
                          "paired with its token ids. Regenerate the corpus (`raydistill generate --overwrite`) with "
                          "a teacher that returns exact token ids, or use train.loss=sequence_kd")


def tokenize_batch(batch: pa.Table, *, tokenizer_dir: str, max_len: int, source: str, stop_ids: list[int],
                   truncated_answers: str, with_topk: bool, packing: bool) -> pa.Table:
    """Ray Data ``map_batches`` function: corpus rows (``CORPUS_COLUMNS``) → ``EXAMPLE_SCHEMA`` rows.

    Rows left out keep a row with ``drop_reason`` set (``error``: a failed answer, which generate
    keeps out of ``data/``; ``truncated``: an answer cut at the token limit with
    ``train.truncated_answers=drop``; ``too_long``: the prompt alone fills ``max_len``),
    so that the driver can count them without reading the data."""
    from ..chat import end_of_turn_ids

    tok = _tokenizer(tokenizer_dir)
    stops = set(stop_ids)
    kept: list[dict] = []
    dropped: list[dict] = []
    for r in batch.to_pylist():
        truncated = r["finish_reason"] == "length"
        reason = None
        ex = None
        if r["error"] or r["finish_reason"] == "error":  # generate keeps these in rejects/; never trained
            reason = "error"
        elif truncated and truncated_answers == "drop":
            reason = "truncated"
        else:
            ids = r["response_token_ids"]
            # A row whose ids were not kept (an empty list for a non-empty answer) is tokenized from text.
            use_ids = source == TEACHER_IDS and bool(ids or not r["response"])
            if with_topk and use_ids:
                _check_topk(r)
            ex = build_example(tok, r["messages"], r["response"] or "", "length" if truncated else "stop",
                               list(ids or []) if use_ids else None, max_len,
                               eot_ids=end_of_turn_ids(tok, r["messages"]), stop_ids=stops,
                               topk_ids=r["top_logprobs_ids"] if with_topk and use_ids else None,
                               topk_logprobs=r["top_logprobs"] if with_topk and use_ids else None)
            if ex is None:
                reason = "too_long"
        if reason is not None:
            dropped.append({"prompt_id": r["prompt_id"], "input_ids": [], "labels": [], "position_ids": [],
                            "kd_positions": [], "topk_ids": [], "topk_logprobs": [], "truncated": truncated,
                            "drop_reason": reason})
        else:
            kept.append(dict(ex, prompt_id=r["prompt_id"], truncated=truncated, drop_reason=None))
    if packing and kept:  # the prompt ids of a packed row are joined with ","
        kept = pack(kept, max_len)
    rows = kept + dropped
    for r in rows:
        r["n_labels"] = sum(1 for x in r["labels"] if x != IGNORE_INDEX)
    return pa.Table.from_pylist(rows, schema=EXAMPLE_SCHEMA)


def choose_label_source(student_tokenizer, manifest: dict, cfg: Config) -> tuple[str, str]:
    """(``teacher_token_ids`` or ``retokenized_text``, why): the teacher's own ids are trained when
    the student's tokenizer has the teacher's token-id space (``chat.tokenizer_fingerprint``
    equal to the corpus manifest's ``teacher_tokenizer``). A corpus without that record is checked
    against ``teacher.model``'s tokenizer when it made the corpus and is at hand locally."""
    from ..chat import tokenizer_fingerprint

    student_fp = tokenizer_fingerprint(student_tokenizer)
    teacher_fp = manifest.get("teacher_tokenizer")
    if teacher_fp is None and manifest.get("teacher") == cfg.teacher.model:
        tok = local_teacher_tokenizer(cfg.teacher.model)
        teacher_fp = tokenizer_fingerprint(tok) if tok is not None else None
    if teacher_fp is None:
        return RETOKENIZED, "the corpus does not record the teacher's tokenizer"
    if teacher_fp != student_fp:
        return RETOKENIZED, "the student's tokenizer differs from the teacher's"
    return TEACHER_IDS, "the student shares the teacher's tokenizer"


def local_teacher_tokenizer(ref: str):
    """The tokenizer of model ``ref`` when its files are on this machine (None otherwise)."""
    from ..models import config_json

    cfg_file = config_json(ref)
    if cfg_file is None or not cfg_file.parent.joinpath("tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cfg_file.parent)


def example_counts(folder) -> dict[str, Any]:
    """Counts of the examples folder ``folder`` (a ``StoragePath``): ``rows`` trained, ``labels``
    (label positions of the trained rows), ``truncated`` (answers cut at the length limit, trained
    or not), and ``dropped`` per reason.

    Read with pyarrow, one parquet row group at a time, and only the three count columns (about
    5 bytes a row): the driver's memory stays constant whatever the corpus size, and no Ray Data
    job is started for what the files' small columns already say.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    totals = {"rows": 0, "labels": 0, "truncated": 0, "dropped": {r: 0 for r in DROP_REASONS}}
    for f in folder.files(".parquet"):
        with f.fs.open_input_file(f.path) as fh:
            for batch in pq.ParquetFile(fh).iter_batches(columns=["drop_reason", "n_labels", "truncated"]):
                reasons = batch.column("drop_reason")
                kept = pc.is_null(reasons)
                totals["rows"] += pc.sum(pc.cast(kept, pa.int64())).as_py() or 0
                totals["truncated"] += pc.sum(pc.cast(batch.column("truncated"), pa.int64())).as_py() or 0
                totals["labels"] += pc.sum(pc.if_else(kept, batch.column("n_labels"), 0)).as_py() or 0
                for reason in DROP_REASONS:
                    totals["dropped"][reason] += pc.sum(
                        pc.cast(pc.equal(pc.fill_null(reasons, ""), reason), pa.int64())).as_py() or 0
    return totals


def read_trained_rows(folder, batch_size: int):
    """Yield the trained rows of the examples folder ``folder`` (a ``StoragePath``), file by file
    in name order, as dicts of column lists of at most ``batch_size`` rows (the columns of
    ``EXAMPLE_SCHEMA`` without the count columns; the last batch may be shorter).

    For the validation split, which every rank reads whole and in the same order: plain pyarrow in
    the worker, one row group in memory at a time, rather than a Ray Data job per rank and epoch
    (measured: about 30 s of job start-up for 3 rows on a 2-core machine).
    """
    import pyarrow.parquet as pq

    pending: list[pa.Table] = []
    n = 0
    for f in sorted(folder.files(".parquet"), key=lambda x: x.path):
        with f.fs.open_input_file(f.path) as fh:
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=batch_size):
                table = trained_rows(pa.Table.from_batches([batch]))
                if table.num_rows:
                    pending.append(table)
                    n += table.num_rows
                while n >= batch_size:
                    whole = pa.concat_tables(pending)
                    yield whole.slice(0, batch_size).to_pydict()
                    rest = whole.slice(batch_size)
                    pending, n = ([rest] if rest.num_rows else []), rest.num_rows
    if n:
        yield pa.concat_tables(pending).to_pydict()


ORDER_KEY = "_order_key"  # int64 column of the rows being sorted (not written)
ORDER_ROWS_PER_PART = 20_000  # rows of one sort partition (a Ray Data block of the sorted corpus)
MAX_ORDER_PARTS = 1024  # sort partitions at most


def order_boundaries(parts: int) -> list[int]:
    """``parts - 1`` int64 values cutting the range of ``order_keys`` into ``parts`` equal ranges
    (the keys are uniform, so the partitions hold about equally many rows). Fixed boundaries, not
    Ray's sampled ones: the partitions, hence the example files and Ray Train's blocks, are the
    same on every run. At least 2 parts (``[0]``): given no boundaries, Ray samples its own."""
    parts = max(2, parts)
    step = 2**64 // parts
    return [-(2**63) + i * step for i in range(1, parts)]


def _with_order_key(batch: pa.Table, seed: int) -> pa.Table:
    return batch.append_column(ORDER_KEY, order_keys(batch.column("prompt_id").to_pylist(), seed))


def write_examples(corpus_files: list, corpus_fs, split: str, out, *, tokenizer_dir: str, cfg: Config, source: str,
                   stop_ids: set[int], with_topk: bool, rows: int | None = None) -> dict[str, Any]:
    """Tokenize the corpus rows of ``split`` into ``out`` (a ``StoragePath`` folder, replaced; its
    ``_COMPLETE`` marker written last) and return their ``example_counts``. ``corpus_files``: the
    corpus's data shards (paths in ``corpus_fs``); ``rows``: the split's corpus rows (the
    manifest's ``splits``), which sizes the sort's partitions (None: one per corpus file).

    Deterministic: the rows are sorted by ``order_keys`` (``train.seed``, prompt id) with Ray
    Data's distributed sort over fixed ``order_boundaries`` (one partition per
    ``ORDER_ROWS_PER_PART`` rows, 2 to ``MAX_ORDER_PARTS``) before tokenizing, and the pipeline
    runs with ``preserve_order``, so the examples' files, their row order (what Ray Train reads in
    file-name order) and which rows are packed together are a function of the corpus's rows and
    ``train.seed`` only, whatever order Ray's tasks finish in or the corpus's files hold the rows
    in. The driver holds no rows.
    """
    import ray

    def of_split(batch: pa.Table) -> pa.Table:
        import pyarrow.compute as pc

        return batch.filter(pc.equal(batch.column("split"), split))

    out.delete()
    if corpus_files:
        t = cfg.train
        parts = len(corpus_files) if rows is None else -(-rows // ORDER_ROWS_PER_PART)
        columns = CORPUS_COLUMNS if with_topk else [c for c in CORPUS_COLUMNS if not c.startswith("top_")]
        ds = ray.data.read_parquet(corpus_files, filesystem=corpus_fs).select_columns(columns)
        if not with_topk:
            ds = ds.map_batches(_no_topk, batch_format="pyarrow", batch_size=None)
        ds = (ds.map_batches(of_split, batch_format="pyarrow", batch_size=None)
              .map_batches(_with_order_key, batch_format="pyarrow", batch_size=None, fn_kwargs={"seed": t.seed})
              .sort(ORDER_KEY, boundaries=order_boundaries(min(parts, MAX_ORDER_PARTS))))
        ds.context.execution_options.preserve_order = True  # this dataset's own context (a copy)
        (ds.map_batches(tokenize_batch, batch_format="pyarrow", batch_size=256,
                      fn_kwargs={"tokenizer_dir": tokenizer_dir, "max_len": t.max_seq_len, "source": source,
                                 "stop_ids": sorted(stop_ids), "truncated_answers": t.truncated_answers,
                                 "with_topk": with_topk, "packing": t.packing})
         .write_parquet(out.uri if out.remote else out.path, filesystem=out.fs))
    out.mkdir()
    (out / COMPLETE).write_text("")
    return example_counts(out)


def _no_topk(batch: pa.Table) -> pa.Table:
    n = batch.num_rows
    return (batch.append_column("top_logprobs_ids", pa.nulls(n, pa.list_(pa.list_(pa.int32()))))
            .append_column("top_logprobs", pa.nulls(n, pa.list_(pa.list_(pa.float32())))))


def trained_rows(batch: pa.Table) -> pa.Table:
    """Ray Data filter: the rows that are trained (``drop_reason`` null), without the count columns."""
    import pyarrow.compute as pc

    kept = batch.filter(pc.is_null(batch.column("drop_reason")))
    return kept.drop_columns(["drop_reason", "n_labels", "truncated"])


def _flat(rows, dtype) -> tuple[Any, Any]:
    """(values, lengths) of a batch of 1-D sequences (lists, numpy arrays, a numpy object array of
    arrays, or a 2-D array): the rows concatenated, and each row's length. No per-element loop."""
    import numpy as np

    if isinstance(rows, np.ndarray) and rows.dtype != object and rows.ndim == 2:
        return rows.astype(dtype, copy=False).reshape(-1), np.full(rows.shape[0], rows.shape[1], dtype=np.int64)
    n = len(rows)
    lens = np.fromiter(map(len, rows), dtype=np.int64, count=n)
    if not lens.sum():
        return np.zeros(0, dtype=dtype), lens
    return np.concatenate(list(rows), dtype=dtype, casting="unsafe"), lens  # one C loop over the rows


def _flat2(rows, dtype) -> tuple[Any, Any, Any]:
    """(values, lengths per inner list, inner lists per row) of a batch of 2-D ragged rows
    (``topk_ids``: per row, one list of k per KD position; lists or numpy object arrays)."""
    import numpy as np

    inner, counts = [], np.zeros(len(rows), dtype=np.int64)
    for i, r in enumerate(rows):  # per row (a micro-batch has batch_size of them), not per token
        if isinstance(r, np.ndarray) and r.dtype != object and r.ndim == 2:
            vals = r.astype(dtype, copy=False).reshape(-1)
            lens = np.full(r.shape[0], r.shape[1], dtype=np.int64)
        else:
            vals, lens = _flat(r, dtype)
        inner.append((vals, lens))
        counts[i] = len(lens)
    values = np.concatenate([v for v, _ in inner]) if inner else np.zeros(0, dtype=dtype)
    lengths = np.concatenate([n for _, n in inner]) if inner else np.zeros(0, dtype=np.int64)
    return values, lengths, counts


def _kd_lists(column, n_pos, dtype) -> tuple[Any, Any, Any]:
    """The top-k lists of each row's KD positions (``topk_ids`` or ``topk_logprobs``), flat:
    (values, length of each position's list, lengths of every list given). Lists past a row's
    ``kd_positions`` are left out; fewer lists than positions is a ValueError naming the row."""
    import numpy as np

    vals, lens, counts = _flat2(column, dtype)
    short = np.flatnonzero(counts < n_pos)
    if len(short):
        i = int(short[0])
        raise ValueError(f"micro-batch row {i}: {counts[i]} top-k lists for {n_pos[i]} kd_positions")
    inner = np.arange(len(lens), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    keep = inner < np.repeat(n_pos, counts)
    return vals[np.repeat(keep, lens)], lens[keep], lens


def collate(rows: dict[str, Any], pad_id: int, packing: bool = False, with_topk: bool = True) -> dict[str, Any]:
    """Right-pad a micro-batch (columns of ``EXAMPLE_SCHEMA``, as lists or numpy object arrays)
    into tensors.

    Returns ``input_ids`` (batch, seq) long, ``labels`` (batch, seq) long with -100 on padding,
    ``attention_mask`` (batch, seq) long (1 = token; None when ``packing``: the packed
    ``position_ids`` (batch, seq) then tell each example apart, and padding gets its own
    positions), and, when ``with_topk`` and the rows carry a ``topk_ids`` column, ``kd_mask`` (batch, seq) bool,
    ``topk_ids`` (batch, seq, k) long and ``topk_logprobs`` (batch, seq, k) float32 (-inf where
    absent), aligned with ``labels``. Padding is masked by position, never by token id, so an EOS
    equal to the pad token stays in the labels.

    Vectorized: the rows are concatenated and scattered into the padded arrays with numpy (no
    Python loop over tokens or KD positions; 4 × 1,536 tokens with k = 20 in a few ms instead of
    0.11 s, ``benchmarks/collate_speed.py``); ``tests/test_collate.py`` pins it to the former
    per-token implementation.
    """
    import numpy as np
    import torch

    ids_flat, lens = _flat(rows["input_ids"], np.int64)
    labs_flat, lab_lens = _flat(rows["labels"], np.int64)
    b, width = len(lens), int(lens.max())
    cols = np.arange(width, dtype=np.int64)
    valid = cols[None, :] < lens[:, None]
    ids = np.full((b, width), pad_id, dtype=np.int64)
    ids[valid] = ids_flat
    labels = np.full((b, width), IGNORE_INDEX, dtype=np.int64)
    labels[cols[None, :] < lab_lens[:, None]] = labs_flat
    pos = np.broadcast_to(cols, (b, width)) - np.where(valid, 0, lens[:, None])  # padding: a block of its own
    if "position_ids" in rows:
        pos[valid] = _flat(rows["position_ids"], np.int64)[0]
    out: dict[str, Any] = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
                           "position_ids": torch.from_numpy(pos),
                           "attention_mask": None if packing else torch.from_numpy(valid.astype(np.int64))}
    kd_rows = rows.get("topk_ids") if with_topk else None
    if kd_rows is not None:  # a logit-KD batch: the arrays are there even when no row has a distribution
        positions, n_pos = _flat(rows["kd_positions"], np.int64)
        rows_of = np.repeat(np.arange(b, dtype=np.int64), n_pos)  # the row of each KD position
        id_vals, id_lens, all_lens = _kd_lists(kd_rows, n_pos, np.int64)
        lp_vals, lp_lens, _ = _kd_lists(rows["topk_logprobs"], n_pos, np.float32)
        k = int(all_lens.max()) if len(all_lens) else 1
        top_ids = np.zeros((b, width, k), dtype=np.int64)
        top_lps = np.full((b, width, k), -np.inf, dtype=np.float32)
        kd_mask = np.zeros((b, width), dtype=bool)
        has = id_lens > 0  # a position without teacher ids keeps no distribution (nor its logprobs)
        cell = rows_of * width + np.where(positions < 0, positions + width, positions)  # flat (row, position)
        for target, values, lengths in ((top_ids, id_vals, id_lens), (top_lps, lp_vals, lp_lens)):
            if not has.all():
                values, lengths = values[np.repeat(has, lengths)], np.where(has, lengths, 0)
            if len(lengths) and lengths.max() > k:
                raise ValueError(f"a top-k list of {int(lengths.max())} entries where the ids have at most {k}")
            j = np.arange(len(values), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            target.reshape(-1)[np.repeat(cell * k, lengths) + j] = values
        kd_mask.reshape(-1)[cell[has]] = True
        out.update(kd_mask=torch.from_numpy(kd_mask), topk_ids=torch.from_numpy(top_ids),
                   topk_logprobs=torch.from_numpy(top_lps))
    return out
