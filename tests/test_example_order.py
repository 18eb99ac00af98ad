"""The train examples' order is a pure function of the corpus rows and train.seed (issue 15: two
fresh `make demo` runs trained different first batches, step-1 loss 8.03 vs 7.83)."""

import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydistill.config import load
from raydistill.corpus import order_keys
from raydistill.storage import storage_path
from raydistill.train.examples import RETOKENIZED, order_boundaries, read_trained_rows, write_examples

from .helpers import eval_config, write_corpus


def test_order_keys_do_not_depend_on_input_order_and_follow_the_seed():
    ids = [f"p{i}" for i in range(200)]
    shuffled = random.Random(1).sample(ids, len(ids))

    def ordered(xs, seed):
        keys = order_keys(xs, seed).to_pylist()
        return [x for _, x in sorted(zip(keys, xs))]

    assert ordered(ids, 0) == ordered(shuffled, 0)
    assert ordered(ids, 0) != ordered(ids, 1)  # train.seed gives another order
    assert order_keys(["p1"], 0).to_pylist() == order_keys(["p1"], 0).to_pylist()  # no hash() salt
    assert order_keys(ids, 0).type == pa.int64()


def test_order_boundaries_cut_the_int64_range_into_equal_parts():
    assert order_boundaries(1) == [0]  # never none: Ray would sample boundaries of its own
    b = order_boundaries(4)
    assert b == [-(2**62), 0, 2**62]
    keys = order_keys([f"p{i}" for i in range(4000)], 0).to_pylist()
    counts = [sum(lo <= k < hi for k in keys) for lo, hi in zip([-(2**63)] + b, b + [2**63])]
    assert all(800 < c < 1200 for c in counts), counts  # uniform keys: about 1000 rows each


def _corpus_files(folder, rows, n_files):
    from raydistill.schema import CORPUS_SCHEMA, conform

    folder.mkdir(parents=True)
    paths = []
    for i in range(n_files):
        part = rows[i::n_files]
        path = folder / f"part-{i:05d}.parquet"
        pq.write_table(conform(pa.Table.from_pylist(part), CORPUS_SCHEMA), path)
        paths.append(str(path))
    return paths


@pytest.mark.slow  # a Ray Data sort and write (about 1 min here); the ordering keys are unit-tested above
def test_write_examples_order_is_the_same_whatever_the_corpus_files(tiny_model, tmp_path, ray_local):
    """The same corpus rows, spread over 3 files or (shuffled) over 4 listed in reverse: the examples
    read back in the trainer's order (file names, then rows) are the same rows in the same order,
    packed the same way, and that order is the order of ``order_keys`` (train.seed)."""
    rows = [{"prompt_id": f"p{i:03d}", "split": "train" if i % 5 else "validation",
             "messages": [{"role": "user", "content": f"Tell me fact {i} about Paris."}],
             "response": f"Fact {i}: " + "Paris is big. " * (i % 4 + 1), "response_token_ids": [],
             "finish_reason": "stop", "error": None, "top_logprobs_ids": None, "top_logprobs": None,
             "task": "qa", "teacher": "t", "generation_params": "{}"}
            for i in range(120)]
    fs = pa.fs.LocalFileSystem()
    n_train = sum(r["split"] == "train" for r in rows)
    for packing in (False, True):
        cfg = load(None, [f"output_dir={tmp_path}", "train.max_seq_len=96", f"train.packing={packing}",
                          "train.seed=7"])
        got = []
        for n, layout in ((3, rows), (4, random.Random(2).sample(rows, len(rows)))):
            files = _corpus_files(tmp_path / f"corpus-{packing}-{n}", layout, n)[::-1]
            out = storage_path(str(tmp_path / f"examples-{packing}-{n}"))
            counts = write_examples(files, fs, "train", out, tokenizer_dir=str(tiny_model), cfg=cfg,
                                    source=RETOKENIZED, stop_ids=set(), with_topk=False, rows=n_train)
            assert counts["rows"] > 0
            got.append([(pid, ids) for batch in read_trained_rows(out, 16)
                        for pid, ids in zip(batch["prompt_id"], batch["input_ids"])])
        assert got[0] == got[1]
        train_ids = [r["prompt_id"] for r in rows if r["split"] == "train"]
        keys = dict(zip(train_ids, order_keys(train_ids, 7).to_pylist()))
        firsts = [pid.split(",")[0] for pid, _ in got[0]]
        assert firsts == sorted(firsts, key=keys.get)
        if not packing:
            assert len(got[0]) == len(train_ids)
        else:
            assert len(got[0]) < len(train_ids)  # rows were packed (the same ones in both layouts)


def test_eval_prompts_come_in_one_order_whatever_the_order_of_prompts_files(tmp_path, tiny_model):
    """prompts/ as generate's Ray tasks may write it: the same rows in another order. evaluate's
    prompts (hence its engine batches) come in the order of order_keys(data.seed, id) both times."""
    from raydistill.corpus import write_prompts
    from raydistill.data import load_prompts
    from raydistill.evaluate.prompts import load_eval_prompts

    from .conftest import mixed_prompts

    cfg_file, sets = eval_config(tmp_path, tiny_model, mixed_prompts(60))
    cfg = load(cfg_file, sets)
    prompts = load_prompts(cfg.data)
    write_corpus(cfg, prompts)
    first = load_eval_prompts(cfg)[0].column("prompt_id").to_pylist()
    shuffled = prompts.take(random.Random(3).sample(range(prompts.num_rows), prompts.num_rows))
    write_prompts(tmp_path / "run" / "corpus", shuffled)
    second = load_eval_prompts(cfg)[0].column("prompt_id").to_pylist()
    assert len(first) > 5 and first == second
    keys = dict(zip(first, order_keys(first, cfg.data.seed).to_pylist()))
    assert first == sorted(first, key=keys.get)
