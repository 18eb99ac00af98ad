"""What the evaluation answers: the held-out prompts of the corpus, checked against its train rows.

``load_eval_prompts`` reads the ``eval.split`` rows of ``corpus/prompts/`` (never ``data.path``
re-read with today's ``data.*``), samples ``eval.limit`` and orders them; ``check_unseen`` refuses a
prompt that was trained on; ``data_changes`` names the data settings changed since the corpus.
Starts no engine.
"""

from __future__ import annotations

import logging

import pyarrow as pa

from ..config import Config

log = logging.getLogger(__name__)


def _flat(d: dict, prefix: str) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "label_map":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def data_changes(corpus, cfg: Config) -> dict[str, dict]:
    """``data.<key>`` → {corpus, now} for each data setting that differs from the corpus's
    ``config.yaml`` ({} when the corpus has none). ``corpus``: a local path, ``s3://`` URI or
    ``storage.StoragePath``."""
    import yaml

    from ..corpus import location

    file = location(corpus) / "config.yaml"
    if not file.is_file():
        return {}
    then = _flat((yaml.safe_load(file.read_text()) or {}).get("data") or {}, "data.")
    now = _flat(cfg.data.model_dump(mode="json"), "data.")
    return {k: {"corpus": then.get(k), "now": now.get(k)} for k in sorted(set(then) | set(now))
            if then.get(k) != now.get(k)}


def _messages_key(messages: list[dict]) -> str:
    """The overlap check's key of a prompt: ``data.split_key`` of its non-system messages (the task
    system prompt that generate adds differs by task; the question asked is what counts)."""
    from ..data import split_key

    return split_key([m for m in messages if m["role"] != "system"])


def check_unseen(corpus, prompts: pa.Table, split: str = "test") -> None:
    """Raise SchemaError when an evaluated prompt was trained on: its id, or its messages (``_messages_key``:
    roles and normalized contents, the task system prompt left out), equal a train row's of the corpus
    (``data/``). The message names the counts and up to 10 example ids of each kind.

    Streams the train rows' ``prompt_id`` and ``messages`` shard by shard with the split filter pushed
    into the parquet reader; the driver holds the evaluated prompts' keys only, not the train set."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from ..corpus import PROMPTS_DIR, location, read_manifest
    from ..schema import SchemaError

    loc = location(corpus)
    ids = prompts.column("prompt_id").to_pylist()
    keys: dict[str, str] = {}
    for pid, msgs in zip(ids, prompts.column("messages").to_pylist()):
        keys.setdefault(_messages_key(msgs), pid)
    wanted = set(ids)
    same_id: list[str] = []
    same_msgs: list[tuple[str, str]] = []
    shards = [(loc / f).path for f in read_manifest(loc).get("shards", [])]
    if shards:
        dataset = pads.dataset(shards, format="parquet", filesystem=loc.fs)
        for batch in dataset.to_batches(columns=["prompt_id", "messages"], filter=pc.field("split") == "train"):
            for pid, msgs in zip(batch.column("prompt_id").to_pylist(), batch.column("messages").to_pylist()):
                if pid in wanted:
                    same_id.append(pid)
                elif (test_id := keys.get(_messages_key(msgs))) is not None:
                    same_msgs.append((test_id, pid))
    if not same_id and not same_msgs:
        return
    parts = []
    if same_id:
        parts.append(f"{len(same_id)} share a train row's prompt id ({', '.join(sorted(same_id)[:10])}"
                     f"{' …' if len(same_id) > 10 else ''})")
    if same_msgs:
        tests = {t for t, _ in same_msgs}
        parts.append(f"{len(tests)} have the same messages as {len(same_msgs)} train row(s) under other ids ("
                     + ", ".join(f"{split} {t} = train {r}" for t, r in sorted(same_msgs)[:10])
                     + f"{' …' if len(same_msgs) > 10 else ''})")
    raise SchemaError(f"{len(set(same_id) | {t for t, _ in same_msgs})} of the {prompts.num_rows} {split} prompt(s) of "
                      f"{loc / PROMPTS_DIR} were trained on (train rows of the corpus in {loc / 'data'}): "
                      f"{'; '.join(parts)}. Regenerate the corpus (`raydistill generate --overwrite`: the split "
                      "now keeps identical prompts, and data.group_field's groups, in one split)")


def load_eval_prompts(cfg: Config) -> tuple[pa.Table, dict[str, dict]]:
    """The prompts to evaluate and the data settings changed since the corpus.

    Reads the ``eval.split`` rows of ``corpus/prompts/`` (the split written by generate),
    keeps a sample of ``eval.limit`` spread over tasks (``data.sample_by_task``, seed ``data.seed``),
    in the order of ``corpus.order_keys`` (``data.seed``, prompt id) whatever the files' order.
    Raises FileNotFoundError without a finished corpus or prompts/, SchemaError when an
    evaluated id is in two splits, or an evaluated prompt's id or messages are a train row's of the
    corpus (``check_unseen``: counts and example ids), and ValueError when the split is empty.
    """
    from ..corpus import PROMPTS_DIR, read_prompts
    from ..data import sample_by_task
    from ..layout import corpus_location

    corpus = corpus_location(cfg)  # local or s3://
    prompts = read_prompts(corpus, (cfg.eval.split,))
    changes = data_changes(corpus, cfg)
    for key, change in changes.items():
        log.warning("evaluate: %s is %r now but %r when the corpus was made; the corpus's own %s split is "
                    "evaluated (%s)", key, change["now"], change["corpus"], cfg.eval.split, corpus / PROMPTS_DIR)
    check_unseen(corpus, prompts, cfg.eval.split)
    if prompts.num_rows == 0:
        raise ValueError(f"the {cfg.eval.split} split of {corpus / PROMPTS_DIR} is empty; raise "
                         f"data.split.{cfg.eval.split} and rerun `raydistill generate`")
    if cfg.eval.limit:
        prompts = sample_by_task(prompts, cfg.eval.limit, cfg.data.seed)
    # One order (a hash of data.seed and the id), not the order generate's Ray tasks wrote prompts/
    # in: the engines' batches, whose numerics depend on their rows, are the same on every run.
    import pyarrow.compute as pc

    from ..corpus import order_keys

    return prompts.take(pc.sort_indices(order_keys(prompts.column("prompt_id").to_pylist(), cfg.data.seed))), changes
