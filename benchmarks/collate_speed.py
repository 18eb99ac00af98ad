"""Collate benchmark (issue 15): the training micro-batch collation, per-token reference vs the
vectorized ``raydistill.train.examples.collate``, and what prefetching hides of it.

    .venv/bin/python benchmarks/collate_speed.py [--batch 4] [--seq-len 1536] [--topk 20] [--repeats 20]

The micro-batch is random and shaped like a long logit-KD batch: ``--batch`` rows of ``--seq-len``
tokens (a 256-token prompt, the rest answer), every answer position with ``--topk`` teacher ids
and log-probabilities, in the form Ray Data's numpy batches have (numpy object arrays of arrays,
``EXAMPLE_SCHEMA`` read back from Arrow).

1. **Collate** (``ratio`` = reference / vectorized seconds per micro-batch, medians over
   ``--repeats``; the two outputs are checked equal first). The reference is the former
   implementation (``tests/test_collate.py:naive_collate``).
2. **Prefetch** (``prefetch_ratio``): a loop of ``--steps`` simulated training steps of
   ``--step-ms`` each (``time.sleep``: a GPU step releases the GIL as sleep does), each fed by
   ``collate``, inline vs through ``examples.prefetched`` (a background thread collating the
   next micro-batches); ratio = inline / prefetched wall time.

No timing is asserted anywhere; the figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from raydistill.train.examples import EXAMPLE_SCHEMA, collate, prefetched  # noqa: E402
from tests.test_collate import naive_collate  # noqa: E402


def micro_batch(batch: int, seq_len: int, k: int, prompt: int = 256, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batch):
        ids = rng.integers(1, 49152, seq_len).tolist()
        n_kd = seq_len - prompt
        rows.append({"prompt_id": "p", "input_ids": ids, "labels": [-100] * prompt + ids[prompt:],
                     "position_ids": list(range(seq_len)), "kd_positions": list(range(prompt, seq_len)),
                     "topk_ids": rng.integers(0, 49152, (n_kd, k)).tolist(),
                     "topk_logprobs": np.sort(-rng.random((n_kd, k)) * 10, axis=1)[:, ::-1].tolist(),
                     "n_labels": n_kd, "truncated": False, "drop_reason": None})
    table = pa.Table.from_pylist(rows, schema=EXAMPLE_SCHEMA).drop_columns(["n_labels", "truncated", "drop_reason"])
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}


def seconds(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1536)
    ap.add_argument("--topk", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--step-ms", type=float, default=50.0)
    a = ap.parse_args()

    batch = micro_batch(a.batch, a.seq_len, a.topk)
    want, got = naive_collate(batch, 0), collate(batch, 0)
    assert all(torch.equal(got[key], want[key]) for key in want if want[key] is not None), "outputs differ"
    ref, vec = [], []
    for _ in range(a.repeats):  # interleaved, so background load spreads over both
        ref += seconds(lambda: naive_collate(batch, 0), 1)
        vec += seconds(lambda: collate(batch, 0), 1)
    print(f"collate {a.batch} x {a.seq_len} tokens, k={a.topk}: reference {statistics.median(ref) * 1e3:.1f} ms, "
          f"vectorized {statistics.median(vec) * 1e3:.2f} ms", file=sys.stderr)

    step = a.step_ms / 1000

    def train(stream):
        t0 = time.perf_counter()
        for m in stream:
            assert m["input_ids"].shape == (a.batch, a.seq_len)
            time.sleep(step)  # the step on the accelerator: the GIL is free meanwhile
        return time.perf_counter() - t0

    raw = [batch] * a.steps
    inline = train(collate(b, 0) for b in raw)
    ahead = train(prefetched(iter(raw), lambda b: collate(b, 0), depth=2))
    print(f"{a.steps} steps of {a.step_ms:.0f} ms: inline {inline:.2f} s, prefetched {ahead:.2f} s", file=sys.stderr)
    print(json.dumps({
        "ratio": round(statistics.median(ref) / statistics.median(vec), 1),
        "reference_ms": round(statistics.median(ref) * 1e3, 2), "vectorized_ms": round(statistics.median(vec) * 1e3, 3),
        "reference_ms_all": [round(x * 1e3, 2) for x in ref], "vectorized_ms_all": [round(x * 1e3, 3) for x in vec],
        "prefetch_ratio": round(inline / ahead, 3), "inline_s": round(inline, 3), "prefetched_s": round(ahead, 3),
        "settings": {"batch": a.batch, "seq_len": a.seq_len, "topk": a.topk, "repeats": a.repeats, "steps": a.steps,
                     "step_ms": a.step_ms, "threads": torch.get_num_threads()}}))


if __name__ == "__main__":
    main()
