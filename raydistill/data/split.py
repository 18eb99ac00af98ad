"""Which split a prompt belongs to (a stable hash of its messages or group, seeded), and which
prompts ``data.limit`` keeps (a seeded sample spread over the task types).

Pure functions of ids, keys and counts; reading and building prompt rows are ``files``' and ``rows``'.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata

import pyarrow as pa

#: How ``make_prompts`` decides splits; recorded in ``corpus/prompts/_COMPLETE`` (``split_rule``). A
#: corpus whose record has none was split by prompt id (an earlier rule).
SPLIT_RULE = "messages-or-group-sha256"


def split_key(messages: list[dict], group: str | None = None) -> str:
    """What decides a prompt's split (``split_of``'s key): ``group:<value>`` when the row has a
    ``data.group_field`` value, else ``messages:`` + the SHA-256 of its normalized messages (roles and
    contents; contents NFC-normalized, lowercased, whitespace collapsed), so the same prompt under two
    ids, or spaced or cased differently, lands in one split. ``messages``: the row's history before
    the task's system prompt is added (a system message of its own counts)."""
    if group is not None:
        return f"group:{group}"
    norm = [[m["role"], " ".join(unicodedata.normalize("NFC", m["content"]).lower().split())] for m in messages]
    return "messages:" + hashlib.sha256(json.dumps(norm, ensure_ascii=False).encode()).hexdigest()


def split_of(key: str, seed: int, validation: float, test: float) -> str:
    """Stable split of one prompt: a hash of (seed, ``key``) mapped to [0, 1). ``key``: ``split_key``
    of the row (any text: the same key always gets the same split)."""
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2**64
    if u < test:
        return "test"
    if u < test + validation:
        return "validation"
    return "train"


def task_quotas(counts: dict[str, int], n: int) -> dict[str, int]:
    """How many of ``n`` sampled prompts each task gets, given its prompt count: ``n × its share``,
    at least one per task when ``n`` ≥ the number of tasks, then largest remainders first (ties
    by task name, so the result is deterministic). ``n`` ≥ the total keeps every prompt."""
    total = sum(counts.values())
    if n >= total:
        return dict(counts)
    exact = {t: n * c / total for t, c in counts.items()}
    floor = 1 if n >= len(counts) else 0  # every task represented while n allows
    quota = {t: max(floor, int(q)) for t, q in exact.items()}
    while sum(quota.values()) > n:  # the floors overshot: take from the task furthest above its share
        t = max((t for t in quota if quota[t] > floor), key=lambda t: (quota[t] - exact[t], t))
        quota[t] -= 1
    for t in sorted(exact, key=lambda t: (-(exact[t] - quota[t]), t)):
        if sum(quota.values()) >= n:
            break
        quota[t] += 1
    return quota


def sample_by_task(table: pa.Table, n: int, seed: int) -> pa.Table:
    """A seeded sample of ``n`` rows of a prompt table, spread over its task types in proportion.

    Each task gets its ``task_quotas`` share; rows within a task are chosen by a hash of (seed,
    prompt id), so the sample is stable across runs and machines. The original row order is kept.
    ``n`` ≥ the row count returns the table unchanged. (The generate stage computes the same
    sample in Ray Data.)
    """
    if n >= table.num_rows:
        return table
    ids = table.column("prompt_id").to_pylist()
    tasks = table.column("task").to_pylist()
    by_task: dict[str, list[int]] = {}
    for i, t in enumerate(tasks):
        by_task.setdefault(t, []).append(i)
    quota = task_quotas({t: len(rows) for t, rows in by_task.items()}, n)
    keep: list[int] = []
    for t, rows in by_task.items():
        rank = sorted(rows, key=lambda i: hashlib.sha256(f"{seed}:sample:{ids[i]}".encode()).digest())
        keep += rank[: quota[t]]
    return table.take(sorted(keep))


def select_split(table: pa.Table, splits: tuple[str, ...]) -> pa.Table:
    """Rows of ``table`` whose ``split`` is in ``splits``."""
    import pyarrow.compute as pc

    return table.filter(pc.is_in(table.column("split"), value_set=pa.array(list(splits))))
