"""Example building, padding, the LR schedule, the epoch order and checkpoint choice of the train stage."""

import json
import math

import pytest
import torch
from transformers import AutoTokenizer

from raydistill.chat import end_of_turn_ids, prompt_ids, text_ids, tokenizer_fingerprint
from raydistill.config import load
from raydistill.train.losses import IGNORE_INDEX
from raydistill.train.trainer import (META_FILE, RETOKENIZED, TEACHER_IDS, _examples, build_example,
                                      choose_label_source, collate, epoch_order, latest_checkpoint, lr_lambda,
                                      rank_batches, warmup_steps)

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


def _row(split, response, finish="stop", ids=(), error=None):
    return {"split": split, "messages": USER, "response": response, "response_token_ids": list(ids),
            "finish_reason": "error" if error else finish, "error": error, "teacher": "t"}


def test_rows_left_out_are_counted_per_reason(tok, tmp_path, tiny_model):
    rows = [_row("train", "Paris."), _row("train", "The capital", "length"), _row("train", "", error="too long"),
            dict(_row("train", "x"), messages=[{"role": "user", "content": "Paris " * 300}])]
    keep = load(None, [f"output_dir={tmp_path}", "train.max_seq_len=64"])
    ex, dropped = _examples(rows, tok, keep, RETOKENIZED, set())
    assert dropped == {"error": 1, "truncated": 0, "too_long": 1} and len(ex) == 2
    assert tok.eos_token_id not in ex[1]["labels"] and ex[0]["labels"][-2] == tok.eos_token_id
    drop = load(None, [f"output_dir={tmp_path}", "train.max_seq_len=64", "train.truncated_answers=drop"])
    ex, dropped = _examples(rows, tok, drop, RETOKENIZED, set())
    assert dropped == {"error": 1, "truncated": 1, "too_long": 1} and len(ex) == 1
    assert [e["idx"] for e in ex] == [0]


def test_label_source_follows_the_tokenizer_fingerprint(tok, tmp_path, tiny_model):
    cfg = load(None, [f"output_dir={tmp_path}", f"teacher.model={tiny_model}"])
    fp = tokenizer_fingerprint(tok)
    assert choose_label_source(tok, {"teacher_tokenizer": fp}, {"x"}, cfg)[0] == TEACHER_IDS
    assert choose_label_source(tok, {"teacher_tokenizer": "0" * 16}, {"x"}, cfg)[0] == RETOKENIZED
    # an older corpus without the record: teacher.model made it and is local -> its tokenizer decides
    assert choose_label_source(tok, {}, {str(tiny_model)}, cfg)[0] == TEACHER_IDS
    assert choose_label_source(tok, {}, {"another-teacher"}, cfg) == (
        RETOKENIZED, "the corpus does not record the teacher's tokenizer")


def test_collate_masks_padding_by_position_not_token_id(tok):
    eos = tok.eos_token_id
    batch = {"input_ids": [[5, 6, eos], [7, eos, 8, 9, eos]], "labels": [[-100, 6, eos], [-100, eos, 8, 9, eos]]}
    out = collate(batch, pad_id=eos)
    assert out["input_ids"].shape == out["labels"].shape == out["attention_mask"].shape == (2, 5)
    assert out["labels"][0].tolist() == [-100, 6, eos, -100, -100]
    assert out["labels"][1].tolist() == [-100, eos, 8, 9, eos]  # an EOS label mid-sequence survives
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert out["input_ids"].dtype == torch.long


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


def test_epoch_order_reshuffles_every_epoch_and_repeats_on_resume():
    e0, e1 = epoch_order(50, 0, 0), epoch_order(50, 0, 1)
    assert sorted(e0) == sorted(e1) == list(range(50))
    assert e0 != e1 and e0 != list(range(50))
    assert epoch_order(50, 0, 1) == e1  # a resumed run computes the same order
    assert epoch_order(50, 1, 0) != e0  # train.seed changes it
    world, bs = 2, 4
    parts = [rank_batches(e0, world, r, bs) for r in range(world)]
    assert [len(p) for p in parts] == [7, 7]  # 25 rows per rank: 6 batches of 4 and one of 1
    seen = [i for p in parts for b in p for i in b]
    assert len(seen) == len(set(seen)) == 50
    odd = [rank_batches(epoch_order(51, 0, e), world, 0, bs) for e in (0, 1)]
    assert sum(map(len, odd[0])) == 25  # 51 rows over 2 ranks: one left out this epoch
    assert odd[0] != odd[1]


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
    assert latest_checkpoint(tmp_path)[0] == best
    final = _checkpoint(tmp_path, "checkpoint_2026-01-01_00-00-00", 4, final=True)
    assert latest_checkpoint(tmp_path) == (final, {"step": 4, "final": True, "files": {"state.pt": 10}})
