"""raydistill.chat: the one way every stage turns chat messages into token ids."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from raydistill.chat import (
    end_of_turn_ids,
    has_special_text,
    prompt_ids,
    stop_token_ids,
    text_ids,
    tokenizer_fingerprint,
)


@pytest.fixture(scope="module")
def tok(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def _rendered_ids(tok, messages):
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def test_ordinary_prompts_tokenize_as_the_whole_rendering(tok):
    for messages in ([{"role": "user", "content": "Hello Paris"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Two plus three?"}]):
        assert prompt_ids(tok, messages) == _rendered_ids(tok, messages)


def test_special_token_text_in_a_message_stays_text(tok):
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    messages = [{"role": "user", "content": "What does the string <|im_end|> mean in a chat log?"}]
    ids = prompt_ids(tok, messages)
    naive = _rendered_ids(tok, messages)
    # the template's own end-of-turn after the user turn only; the naive rendering has one more
    assert ids.count(eot) == 1 and naive.count(eot) == 2
    assert tok.decode(ids) == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # the content's ids are the content tokenized as plain text
    content = text_ids(tok, messages[0]["content"])
    assert eot not in content and tok.decode(content) == messages[0]["content"]
    start = ids.index(content[0])
    assert ids[start:start + len(content)] == content


def test_a_template_that_rewrites_content_falls_back_to_the_rendering(tok, caplog):
    stripping = AutoTokenizer.from_pretrained(tok.name_or_path)
    stripping.chat_template = tok.chat_template.replace("message['content']", "message['content'] | trim")
    messages = [{"role": "user", "content": "  spaced <|im_end|>  "}]
    assert prompt_ids(stripping, messages) == _rendered_ids(stripping, messages)
    assert "rewrites message content" in caplog.text


def test_end_of_turn_and_stop_ids(tok, tiny_model):
    assert tok.decode(end_of_turn_ids(tok)) == "<|im_end|>\n"
    assert stop_token_ids(tiny_model) == {tok.eos_token_id}
    assert has_special_text(tok, "a <|im_start|> b") and not has_special_text(tok, "<im_end>")


def test_fingerprint_is_the_same_in_every_process(tiny_model, tmp_path):
    """It is compared across commands (generate writes it, train reads it): Python's per-process
    hash seed must not change it, also with many special tokens of one length (SmolLM2 has them)."""
    many = AutoTokenizer.from_pretrained(tiny_model)
    many.add_tokens([f"<|x{i}|>" for i in range(8)], special_tokens=True)
    many.save_pretrained(tmp_path / "tok")
    code = ("import sys; from transformers import AutoTokenizer; from raydistill.chat import tokenizer_fingerprint;"
            f"print(tokenizer_fingerprint(AutoTokenizer.from_pretrained({str(tmp_path / 'tok')!r})))")
    seen = set()
    for seed in ("1", "2"):  # and this process, whose seed is random
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env=dict(os.environ, PYTHONHASHSEED=seed))
        seen.add(out.stdout.strip().splitlines()[-1])
    assert seen == {tokenizer_fingerprint(many)}


def test_fingerprint_tells_token_id_spaces_apart(tok, tmp_path):
    from .conftest import build_tiny_model

    other = AutoTokenizer.from_pretrained(build_tiny_model(tmp_path / "other", num_layers=1))
    assert tokenizer_fingerprint(other) == tokenizer_fingerprint(tok)  # same recipe, same ids
    other.add_tokens(["<extra>"], special_tokens=True)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tok)
    assert json.dumps(tokenizer_fingerprint(tok))  # a plain string
