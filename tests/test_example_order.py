"""The train examples' order is a pure function of the corpus rows and train.seed (issue 15: two
fresh `make demo` runs trained different first batches, step-1 loss 8.03 vs 7.83)."""

import random

import pyarrow as pa

from raydistill.config import load
from raydistill.train.examples import order_boundaries, order_keys


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


def test_eval_prompts_come_in_one_order_whatever_the_order_of_prompts_files(tmp_path, tiny_model):
    """prompts/ as generate's Ray tasks may write it: the same rows in another order. evaluate's
    prompts (hence its engine batches) come in the order of order_keys(data.seed, id) both times."""
    from raydistill.corpus import write_prompts
    from raydistill.data import load_prompts
    from raydistill.evaluate import load_eval_prompts

    from .conftest import mixed_prompts
    from .test_evaluate import _config, write_corpus

    cfg_file, sets = _config(tmp_path, tiny_model, mixed_prompts(60))
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
