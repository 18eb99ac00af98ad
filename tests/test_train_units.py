"""Example building (labels, teacher top-k alignment, packing), padding, the LR schedule, the step plan
and checkpoint choice of the train stage."""

import json
import math

import pytest
import torch
from transformers import AutoTokenizer

from raydistill.chat import end_of_turn_ids, prompt_ids, text_ids, tokenizer_fingerprint
from raydistill.config import load
from raydistill.train.checkpoints import META_FILE, latest_checkpoint, prune
from raydistill.train.examples import (
    RETOKENIZED,
    TEACHER_IDS,
    build_example,
    choose_label_source,
    collate,
    pack,
    tokenize_batch,
)
from raydistill.train.loop import lr_lambda
from raydistill.train.losses import IGNORE_INDEX
from raydistill.train.plan import plan_steps, warmup_steps

USER = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def tok(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def _answer(ex):
    return [x for x in ex["labels"] if x != IGNORE_INDEX]


def test_finished_answer_ends_with_the_templates_end_of_turn(tok):
    # SmolLM2-style: pad == eos == <|im_end|>; the final EOS must stay a label.
    assert tok.pad_token_id == tok.eos_token_id
    eot = end_of_turn_ids(tok, USER)
    assert eot == [tok.eos_token_id, *text_ids(tok, "\n")]  # <|im_end|>\n
    ex = build_example(tok, USER, "The capital of France is Paris.", "stop", None, 256, eot_ids=eot)
    prompt = prompt_ids(tok, USER)
    assert ex["labels"][:len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert ex["input_ids"][:len(prompt)] == prompt
    assert _answer(ex) == text_ids(tok, "The capital of France is Paris.") + eot
    assert ex["input_ids"][len(prompt):] == _answer(ex)


def test_truncated_answer_gets_no_end_of_turn(tok):
    eot = end_of_turn_ids(tok, USER)
    cut = text_ids(tok, "The capital of France is")
    ex = build_example(tok, USER, "The capital of France is", "length", None, 256, eot_ids=eot)
    assert _answer(ex) == cut  # ends with the last answer token: no <|im_end|>, no newline
    assert tok.eos_token_id not in ex["labels"]
    # from the teacher's ids too: a cut answer ends without a stop id, and none is added
    ex = build_example(tok, USER, "ignored", "length", cut, 256, eot_ids=eot, stop_ids={tok.eos_token_id})
    assert _answer(ex) == cut and ex["labels"][-1] == cut[-1]


def test_the_teachers_own_ids_are_trained(tok):
    """Ids that differ from re-tokenizing the text (Paris spelled one character per token)."""
    eot = end_of_turn_ids(tok, USER)
    spelled = [i for ch in "Paris" for i in text_ids(tok, ch)]
    assert spelled != text_ids(tok, "Paris") and tok.decode(spelled) == "Paris"
    stored = spelled + [tok.eos_token_id]  # a finished answer's ids end with the stop token
    ex = build_example(tok, USER, "Paris", "stop", stored, 256, eot_ids=eot, stop_ids={tok.eos_token_id})
    assert _answer(ex) == spelled + eot  # the stop id became the template's end of turn <|im_end|>\n
    assert _answer(build_example(tok, USER, "Paris", "stop", None, 256, eot_ids=eot)) == text_ids(tok, "Paris") + eot


def test_text_spelling_a_special_token_stays_text(tok):
    msgs = [{"role": "user", "content": "What does the string <|im_end|> mean in a chat log?"}]
    ex = build_example(tok, msgs, "It ends a turn.", "stop", None, 256, eot_ids=end_of_turn_ids(tok, msgs))
    prompt_len = ex["labels"].index(next(x for x in ex["labels"] if x != IGNORE_INDEX))
    # one <|im_end|> in the prompt: the template's, after the user turn; the user's is characters
    assert ex["input_ids"][:prompt_len].count(tok.eos_token_id) == 1
    assert "<|im_end|> mean" in tok.decode(ex["input_ids"][:prompt_len])


def test_truncation_and_too_long_prompt(tok):
    eot = end_of_turn_ids(tok, USER)
    msgs = [{"role": "user", "content": "Paris " * 50}]
    assert build_example(tok, msgs, "ok", "stop", None, 16, eot_ids=eot) is None
    ex = build_example(tok, [{"role": "user", "content": "hi"}], "The sky is blue. " * 20, "stop", None, 24,
                       eot_ids=eot)
    assert len(ex["input_ids"]) == len(ex["labels"]) == 24


def _row(split, response, finish="stop", ids=(), error=None, messages=USER):
    return {"prompt_id": f"p{len(response)}", "split": split, "messages": messages, "response": response,
            "response_token_ids": list(ids), "finish_reason": "error" if error else finish, "error": error,
            "top_logprobs_ids": None, "top_logprobs": None}


def _tokenize(tok, tmp_path, rows, *sets, source=RETOKENIZED, with_topk=False, packing=False, stop_ids=()):
    import pyarrow as pa

    cfg = load(None, [f"output_dir={tmp_path}", *sets])
    table = tokenize_batch(pa.Table.from_pylist(rows), tokenizer_dir=tok.name_or_path, max_len=cfg.train.max_seq_len,
                           source=source, stop_ids=list(stop_ids), truncated_answers=cfg.train.truncated_answers,
                           with_topk=with_topk, packing=packing)
    return table.to_pylist()


def test_rows_left_out_are_counted_per_reason(tok, tmp_path, tiny_model):
    rows = [_row("train", "Paris."), _row("train", "The capital", "length"), _row("train", "", error="too long"),
            _row("train", "x", messages=[{"role": "user", "content": "Paris " * 300}])]
    out = _tokenize(tok, tmp_path, rows, "train.max_seq_len=64")
    assert [r["drop_reason"] for r in out] == [None, None, "error", "too_long"]
    assert [r["truncated"] for r in out] == [False, True, False, False]
    kept = [r for r in out if r["drop_reason"] is None]
    assert tok.eos_token_id not in kept[1]["labels"] and kept[0]["labels"][-2] == tok.eos_token_id
    assert [r["n_labels"] for r in kept] == [sum(x != IGNORE_INDEX for x in r["labels"]) for r in kept]
    out = _tokenize(tok, tmp_path, rows, "train.max_seq_len=64", "train.truncated_answers=drop")
    assert [r["drop_reason"] for r in out] == [None, "truncated", "error", "too_long"]


def test_teacher_topk_is_aligned_with_the_answer_labels(tok):
    """Entry j of the stored top-k belongs to generated token j; the stop token's distribution moves
    to the first end-of-turn id (the same token), the template's extra newline has none."""
    eot = end_of_turn_ids(tok, USER)
    spelled = [i for ch in "Paris" for i in text_ids(tok, ch)]
    stored = spelled + [tok.eos_token_id]
    top_ids = [[t, t + 1] for t in stored]
    top_lps = [[-0.1 * (j + 1), -3.0] for j in range(len(stored))]
    ex = build_example(tok, USER, "Paris", "stop", stored, 256, eot_ids=eot, stop_ids={tok.eos_token_id},
                       topk_ids=top_ids, topk_logprobs=top_lps)
    prompt = len(prompt_ids(tok, USER))
    assert ex["kd_positions"] == list(range(prompt, prompt + len(stored)))
    for j, pos in enumerate(ex["kd_positions"]):
        assert ex["labels"][pos] == stored[j] == ex["topk_ids"][j][0]  # the label is the teacher's top-1 here
    assert ex["topk_logprobs"] == top_lps
    assert len(ex["labels"]) == prompt + len(spelled) + len(eot)  # <|im_end|>\n: only <|im_end|> has a distribution
    cut = build_example(tok, USER, "Paris", "stop", stored, prompt + 2, eot_ids=eot, stop_ids={tok.eos_token_id},
                        topk_ids=top_ids, topk_logprobs=top_lps)
    assert cut["kd_positions"] == [prompt, prompt + 1] and len(cut["topk_ids"]) == 2  # cut with the sequence


def test_packing_keeps_each_example_apart(tok):
    eot = end_of_turn_ids(tok, USER)
    exs = [dict(build_example(tok, USER, w, "stop", None, 256, eot_ids=eot), prompt_id=w, truncated=False)
           for w in ("Paris.", "Lyon.", "A much longer answer about the river Seine and its bridges.")]
    lens = [len(e["input_ids"]) for e in exs]
    rows = pack(exs, max_len=lens[0] + lens[1])
    assert len(rows) == 2 and rows[0]["prompt_id"] == "Paris.,Lyon."
    assert rows[0]["input_ids"] == exs[0]["input_ids"] + exs[1]["input_ids"]
    assert rows[0]["position_ids"] == list(range(lens[0])) + list(range(lens[1]))
    batch = collate({k: [r[k] for r in rows] for k in ("input_ids", "labels", "position_ids")}, pad_id=0, packing=True)
    assert batch["attention_mask"] is None  # transformers tells packed examples apart by their positions
    from transformers.masking_utils import find_packed_sequence_indices

    seq = find_packed_sequence_indices(batch["position_ids"])
    assert seq[0, lens[0] - 1] != seq[0, lens[0]]  # a new block where the second example starts


def test_collate_builds_the_teacher_tensors(tok):
    rows = {"input_ids": [[5, 6, 7], [8, 9]], "labels": [[-100, 6, 7], [-100, 9]], "position_ids": [[0, 1, 2], [0, 1]],
            "kd_positions": [[1, 2], []], "topk_ids": [[[6, 3], [7]], []], "topk_logprobs": [[[-0.1, -2.0], [-0.2]], []]}
    out = collate(rows, pad_id=0)
    assert out["topk_ids"].shape == out["topk_logprobs"].shape == (2, 3, 2)
    assert out["kd_mask"].tolist() == [[False, True, True], [False, False, False]]
    assert out["topk_ids"][0, 1].tolist() == [6, 3] and out["topk_logprobs"][0, 2, 1] == float("-inf")
    assert out["position_ids"][1].tolist() == [0, 1, 0]  # padding: a block of its own


def test_label_source_follows_the_tokenizer_fingerprint(tok, tmp_path, tiny_model):
    cfg = load(None, [f"output_dir={tmp_path}", f"teacher.model={tiny_model}"])
    fp = tokenizer_fingerprint(tok)
    assert choose_label_source(tok, {"teacher_tokenizer": fp}, cfg)[0] == TEACHER_IDS
    assert choose_label_source(tok, {"teacher_tokenizer": "0" * 16}, cfg)[0] == RETOKENIZED
    # an older corpus without the record: teacher.model made it and is local -> its tokenizer decides
    assert choose_label_source(tok, {"teacher": str(tiny_model)}, cfg)[0] == TEACHER_IDS
    assert choose_label_source(tok, {"teacher": "another-teacher"}, cfg) == (
        RETOKENIZED, "the corpus does not record the teacher's tokenizer")


def test_collate_masks_padding_by_position_not_token_id(tok):
    eos = tok.eos_token_id
    batch = {"input_ids": [[5, 6, eos], [7, eos, 8, 9, eos]], "labels": [[-100, 6, eos], [-100, eos, 8, 9, eos]]}
    out = collate(batch, pad_id=eos)
    assert out["input_ids"].shape == out["labels"].shape == out["attention_mask"].shape == (2, 5)
    assert out["labels"][0].tolist() == [-100, 6, eos, -100, -100]
    assert out["labels"][1].tolist() == [-100, eos, 8, 9, eos]  # an EOS label mid-sequence survives
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert out["input_ids"].dtype == torch.long and "kd_mask" not in out


def test_lr_schedule_warmup_then_cosine():
    total, warmup = 20, 4
    vals = [lr_lambda(s, total, warmup) for s in range(total)]
    assert vals[:4] == [0.25, 0.5, 0.75, 1.0]
    assert vals[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(vals[4:], vals[5:]))
    assert lr_lambda(total, total, warmup) == pytest.approx(0.0, abs=1e-12)
    mid = warmup + (total - warmup) // 2
    assert lr_lambda(mid, total, warmup) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    # the figures of the issue: a 30-step run (warmup 3) is at 0.357 at its 20th step (0-based 19)
    assert lr_lambda(19, 30, warmup_steps(30, 0.1)) == pytest.approx(0.357, abs=1e-3)


def test_step_plan_gives_every_rank_the_same_steps():
    assert plan_steps(50, 2, 4, 1) == (25, 7, 7)  # 25 rows per rank: 6 micro-batches of 4 and one of 1
    assert plan_steps(51, 2, 4, 1) == (25, 7, 7)  # one row left out of each epoch
    assert plan_steps(50, 2, 4, 3) == (25, 7, 3)  # 3 + 3 + 1 micro-batches per optimizer step
    assert plan_steps(1, 2, 4, 1)[0] == 0


def _checkpoint(root, name, step, final=False, broken=False):
    d = root / name
    d.mkdir(parents=True)
    (d / "state.pt").write_bytes(b"x" * 10)
    files = {"state.pt": 11 if broken else 10}
    (d / META_FILE).write_text(json.dumps({"step": step, "final": final, "files": files}))
    return d


def test_latest_checkpoint_is_the_highest_complete_step(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    _checkpoint(tmp_path, "checkpoint_2026-01-01_00-00-03", 3)
    best = _checkpoint(tmp_path, "checkpoint_2026-01-01_00-00-01", 4)  # names do not order steps
    _checkpoint(tmp_path, "checkpoint_2026-01-01_00-00-09", 5, broken=True)  # upload cut short
    (tmp_path / "checkpoint_2026-01-01_00-00-10").mkdir()  # no meta file yet
    assert latest_checkpoint(tmp_path)[0].path == str(best)
    final = _checkpoint(tmp_path, "checkpoint_2026-01-01_00-00-00", 4, final=True)
    found = latest_checkpoint(tmp_path)
    assert found[0].path == str(final) and found[1] == {"step": 4, "final": True, "files": {"state.pt": 10}}


def test_prune_keeps_the_latest_and_the_best(tmp_path):
    for step, val in [(1, 2.0), (2, 1.0), (3, 1.5), (4, 1.7), (5, None)]:
        d = _checkpoint(tmp_path, f"checkpoint_{step}", step)
        meta = json.loads((d / META_FILE).read_text())
        (d / META_FILE).write_text(json.dumps(dict(meta, val_loss=val)))
    (tmp_path / "checkpoint_6").mkdir()  # being written: left alone
    assert sorted(prune(tmp_path, keep=2)) == ["checkpoint_1", "checkpoint_3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_2", "checkpoint_4", "checkpoint_5", "checkpoint_6"]


def test_packed_examples_get_the_logits_they_get_alone(tok, tiny_model):
    """Each packed example attends only to itself: its logits equal those of the example run alone,
    through the same forward call the trainer makes (position ids, no attention mask, no KV cache)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    eot = end_of_turn_ids(tok, USER)
    exs = [dict(build_example(tok, USER, w, "stop", None, 256, eot_ids=eot), prompt_id=w, truncated=False)
           for w in ("Paris.", "The river Seine.")]
    row = pack(exs, max_len=512)
    assert len(row) == 1
    packed = collate({k: [row[0][k]] for k in ("input_ids", "labels", "position_ids")}, pad_id=0, packing=True)
    with torch.no_grad():
        both = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        n0 = len(exs[0]["input_ids"])
        for start, ex in ((0, exs[0]), (n0, exs[1])):
            alone = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0]
            assert torch.allclose(both[start:start + len(ex["input_ids"])], alone, atol=1e-5)


def test_validation_reader_and_counts_see_every_trained_row_once_in_file_order(tmp_path):
    """read_trained_rows (the workers' validation reader) and example_counts (the driver's counts)
    read the examples folder with pyarrow: kept rows in file then row order, rebatched across files
    and row groups, dropped rows counted by reason and never yielded."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raydistill.storage import storage_path
    from raydistill.train.examples import EXAMPLE_SCHEMA, example_counts, read_trained_rows

    reasons = [None, "too_long", None, None, "error", None, None, "truncated", None]
    rows = [{"prompt_id": f"p{i}", "input_ids": [1, 2, i], "labels": [-100, 2, i], "position_ids": [0, 1, 2],
             "kd_positions": [], "topk_ids": [], "topk_logprobs": [], "n_labels": 2, "truncated": r == "truncated",
             "drop_reason": r} for i, r in enumerate(reasons)]
    folder = tmp_path / "examples"
    folder.mkdir()
    # two files (the second sorts first by name: order is by name), small row groups
    pq.write_table(pa.Table.from_pylist(rows[5:], schema=EXAMPLE_SCHEMA), folder / "a.parquet", row_group_size=2)
    pq.write_table(pa.Table.from_pylist(rows[:5], schema=EXAMPLE_SCHEMA), folder / "b.parquet", row_group_size=2)
    loc = storage_path(folder)
    batches = list(read_trained_rows(loc, batch_size=2))
    expected = [f"p{i}" for i in (5, 6, 8, 0, 2, 3)]
    assert [len(b["prompt_id"]) for b in batches] == [2, 2, 2]
    assert [p for b in batches for p in b["prompt_id"]] == expected
    assert "drop_reason" not in batches[0] and batches[0]["input_ids"][0] == [1, 2, 5]
    assert [p for b in read_trained_rows(loc, batch_size=4) for p in b["prompt_id"]] == expected
    assert [len(b["prompt_id"]) for b in read_trained_rows(loc, batch_size=4)] == [4, 2]
    assert example_counts(loc) == {"rows": 6, "labels": 12, "truncated": 1,
                                   "dropped": {"error": 1, "truncated": 1, "too_long": 1}}
    assert list(read_trained_rows(storage_path(tmp_path / "none"), 2)) == []
