"""The vectorized ``collate`` gives exactly the tensors of the former per-token implementation
(kept here as the reference), on random micro-batches with padding, packing and positions
without a teacher distribution, in every form the rows arrive in (Python lists from pyarrow's
``to_pydict``, numpy object arrays from Ray Data's numpy batches). And ``prefetched`` yields what
a plain loop would, in order, skipping without collating."""

from __future__ import annotations

import random
import time

import numpy as np
import pyarrow as pa
import pytest
import torch

from raydistill.train.examples import EXAMPLE_SCHEMA, IGNORE_INDEX, collate, pack, prefetched


def naive_collate(rows, pad_id, packing=False, with_topk=True):
    """The former implementation (a Python loop over rows, KD positions and tokens)."""
    seqs = [list(x) for x in rows["input_ids"]]
    labs = [list(x) for x in rows["labels"]]
    b, width = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    pos = torch.zeros((b, width), dtype=torch.long)
    for i, (s, lab) in enumerate(zip(seqs, labs)):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(s)] = 1
        p = list(rows["position_ids"][i]) if "position_ids" in rows else list(range(len(s)))
        pos[i, : len(s)] = torch.tensor(p, dtype=torch.long)
        pos[i, len(s):] = torch.arange(width - len(s))
    out = {"input_ids": ids, "labels": labels, "position_ids": pos, "attention_mask": None if packing else mask}
    kd_rows = rows.get("topk_ids") if with_topk else None
    if kd_rows is not None:
        k = max([len(v) for x in kd_rows for v in x] or [1])
        top_ids = torch.zeros((b, width, k), dtype=torch.long)
        top_lps = torch.full((b, width, k), float("-inf"), dtype=torch.float32)
        kd_mask = torch.zeros((b, width), dtype=torch.bool)
        for i in range(b):
            positions = list(rows["kd_positions"][i])
            for j, p in enumerate(positions):
                row_ids = list(rows["topk_ids"][i][j])
                row_lps = list(rows["topk_logprobs"][i][j])
                if not row_ids:
                    continue
                top_ids[i, p, : len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
                top_lps[i, p, : len(row_lps)] = torch.tensor(row_lps, dtype=torch.float32)
                kd_mask[i, p] = True
        out.update(kd_mask=kd_mask, topk_ids=top_ids, topk_logprobs=top_lps)
    return out


def _example(rng: random.Random, k: int, max_len: int) -> dict:
    prompt, answer = rng.randint(1, 12), rng.randint(0, 20)
    n = min(prompt + answer, max_len)
    ids = [rng.randrange(1, 500) for _ in range(n)]
    labels = [IGNORE_INDEX] * min(prompt, n) + ids[prompt:]
    n_kd = rng.randint(0, max(0, n - prompt))
    kd_ids, kd_lps = [], []
    for _ in range(n_kd):
        width = 0 if rng.random() < 0.15 else k  # some positions carry no teacher distribution
        kd_ids.append([rng.randrange(500) for _ in range(width)])
        kd_lps.append(sorted((-rng.random() * 9 for _ in range(width)), reverse=True))
    return {"prompt_id": f"p{rng.random()}", "input_ids": ids, "labels": labels, "position_ids": list(range(n)),
            "kd_positions": list(range(prompt, prompt + n_kd)), "topk_ids": kd_ids, "topk_logprobs": kd_lps}


def _batch(seed: int, packing: bool, k: int = 5, b: int = 4, max_len: int = 40) -> list[dict]:
    rng = random.Random(seed)
    examples = [_example(rng, k, max_len) for _ in range(b * (3 if packing else 1))]
    return pack(examples, max_len) if packing else examples


def _forms(rows: list[dict]):
    """The micro-batch as pyarrow's to_pydict gives it (lists), and as Ray Data's numpy batch
    format does (numpy object arrays of arrays, float32 logprobs)."""
    table = pa.Table.from_pylist([dict(r, n_labels=0, truncated=False, drop_reason=None) for r in rows],
                                 schema=EXAMPLE_SCHEMA).drop_columns(["n_labels", "truncated", "drop_reason"])
    yield "lists", table.to_pydict()
    yield "numpy", {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}


def _equal(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key, w in want.items():
        g = got[key]
        if w is None:
            assert g is None, key
            continue
        assert g.dtype == w.dtype and g.shape == w.shape, (key, g.dtype, w.dtype, g.shape, w.shape)
        assert torch.equal(g, w), key


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("packing", [False, True])
def test_vectorized_collate_equals_the_per_token_reference(seed, packing):
    rows = _batch(seed, packing)
    for form, batch in _forms(rows):
        for with_topk in (False, True):
            got = collate(batch, pad_id=2, packing=packing, with_topk=with_topk)
            _equal(got, naive_collate(batch, pad_id=2, packing=packing, with_topk=with_topk))
        assert got["kd_mask"].any() and (got["attention_mask"] is None) == packing, form
        assert got["topk_ids"].shape[-1] == 5


def test_collate_edge_cases_match_the_reference():
    # no KD position anywhere (k = 1), one row of length 1, and a 2-D array form (equal lengths)
    rows = {"input_ids": [[5], [6, 7, 8]], "labels": [[5], [-100, 7, 8]], "position_ids": [[0], [0, 1, 2]],
            "kd_positions": [[], []], "topk_ids": [[], []], "topk_logprobs": [[], []]}
    _equal(collate(rows, 0), naive_collate(rows, 0))
    uniform = {"input_ids": np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int32),
               "labels": np.array([[-100, 2, 3], [-100, -100, 6]], dtype=np.int32),
               "kd_positions": np.array([[1, 2], [2, 2]], dtype=np.int32)[:, :1],
               "topk_ids": np.array([[[7, 8]], [[9, 10]]], dtype=np.int32),
               "topk_logprobs": np.array([[[-0.1, -2.5]], [[-0.3, -1.5]]], dtype=np.float32)}
    _equal(collate(uniform, 0), naive_collate(uniform, 0))


def test_fewer_topk_lists_than_kd_positions_names_the_row():
    rows = {"input_ids": [[1, 2, 3]], "labels": [[-100, 2, 3]], "kd_positions": [[1, 2]],
            "topk_ids": [[[4, 5]]], "topk_logprobs": [[[-0.1, -0.2]]]}
    with pytest.raises(ValueError, match=r"micro-batch row 0: 1 top-k lists for 2 kd_positions"):
        collate(rows, 0)


def test_prefetched_yields_in_order_skips_without_calling_and_raises_from_the_thread():
    seen = []

    def fn(x):
        seen.append(x)
        return x * 10

    assert list(prefetched(iter(range(7)), fn, depth=2, skip=3)) == [None, None, None, 30, 40, 50, 60]
    assert seen == [3, 4, 5, 6]  # skipped batches are never collated

    def failing(x):
        if x == 2:
            raise ValueError("bad row 2")
        return x

    got = []
    with pytest.raises(ValueError, match="bad row 2"):
        for item in prefetched(iter(range(5)), failing):
            got.append(item)
    assert got == [0, 1]
    # a consumer that stops early (a break) ends the thread instead of leaving it blocked, and the
    # source generator is closed (Ray Data's iter_batches stops its executor on close)
    closed = []

    def source():
        try:
            yield from range(1000)
        finally:
            closed.append(True)

    gen = prefetched(source(), lambda x: x, depth=1)
    assert next(gen) == 0
    gen.close()
    for _ in range(50):
        if closed:
            break
        time.sleep(0.05)
    assert closed == [True]
