"""Example building, padding and the LR schedule of the train stage."""

import math

import pytest
import torch
from transformers import AutoTokenizer

from raydistill.train.losses import IGNORE_INDEX
from raydistill.train.trainer import collate, lr_lambda, tokenize_example


@pytest.fixture(scope="module")
def tok(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def test_labels_mask_prompt_and_keep_final_eos(tok):
    # SmolLM2-style: pad == eos == <|im_end|>; the final EOS must stay a label.
    assert tok.pad_token_id == tok.eos_token_id
    msgs = [{"role": "user", "content": "Two plus three?"}]
    ex = tokenize_example(tok, msgs, "Two plus three is five.", max_len=256)
    prompt_len = len(tok(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
                         add_special_tokens=False)["input_ids"])
    assert ex["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    completion = ex["labels"][prompt_len:]
    assert IGNORE_INDEX not in completion
    assert tok.eos_token_id in completion  # end of turn learned
    assert tok.decode(completion, skip_special_tokens=True).startswith("Two plus three is five.")
    assert ex["input_ids"][prompt_len:] == completion


def test_truncation_and_too_long_prompt(tok):
    msgs = [{"role": "user", "content": "Paris " * 50}]
    assert tokenize_example(tok, msgs, "ok", max_len=16) is None
    ex = tokenize_example(tok, [{"role": "user", "content": "hi"}], "The sky is blue. " * 20, max_len=24)
    assert len(ex["input_ids"]) == len(ex["labels"]) == 24


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
