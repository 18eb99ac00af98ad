"""Chat formatting and tokenization shared by every stage (generate, train, evaluate).

One function turns chat messages into prompt token ids, so that both engines, training and
evaluation see exactly the same tokens:

- the chat template is rendered as text and tokenized with ``add_special_tokens=False`` (the
  template writes its own BOS, if any: Llama-3-style templates start with ``<|begin_of_text|>``,
  and letting the tokenizer add another would double it);
- text *inside* a message is text: a user who writes the string ``<|im_end|>`` gets the
  characters, not the end-of-turn token. Message content is tokenized with special tokens split
  (``split_special_tokens=True``); only the template's own markup yields special tokens.

Heavy imports stay out: functions take a loaded tokenizer, or read JSON files.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Private-use characters: never produced by a tokenizer's special tokens, kept by every template.
_OPEN, _CLOSE = "\ue000", "\ue001"


def _special_strings(tokenizer) -> list[str]:
    """The text forms of the tokenizer's special tokens (those it would turn into one special id)."""
    out = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False):
            out.add(str(tok.content) if hasattr(tok, "content") else str(tok))
    # Longest first (so a longer token is matched before its prefix), then by text: never by the
    # set's order, which changes with Python's per-process hash seed.
    return sorted((s for s in out if s), key=lambda s: (-len(s), s))


def has_special_text(tokenizer, text: str) -> bool:
    """True when ``text`` spells one of the tokenizer's special tokens (e.g. ``<|im_end|>``)."""
    return any(s in text for s in _special_strings(tokenizer))


def text_ids(tokenizer, text: str) -> list[int]:
    """Token ids of plain text: no BOS/EOS added, special-token spellings kept as characters."""
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def _template_ids(tokenizer, text: str) -> list[int]:
    """Token ids of template markup: special tokens recognised, nothing added."""
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


def _segments(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[tuple[str, bool]] | None:
    """The rendered conversation cut into (text, is_message_content) pieces, or None when the
    template transforms message content (then the pieces could not be told apart)."""
    marked = [dict(m, content=f"{_OPEN}{i}{_CLOSE}") for i, m in enumerate(messages)]
    rendered = _render(tokenizer, marked, add_generation_prompt)
    pieces: list[tuple[str, bool]] = []
    rest = rendered
    for i, m in enumerate(messages):
        mark = f"{_OPEN}{i}{_CLOSE}"
        if rendered.count(mark) != 1:
            return None
        before, _, rest = rest.partition(mark)
        pieces += [(before, False), (m["content"], True)]
    pieces.append((rest, False))
    if "".join(p for p, _ in pieces) != _render(tokenizer, messages, add_generation_prompt):
        return None
    return pieces


def prompt_ids(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a chat prompt, as every raydistill stage sends it to a model.

    Args:
        tokenizer: a transformers tokenizer with a chat template.
        messages: ``[{"role": ..., "content": ...}, ...]``.
        add_generation_prompt: end with the template's assistant header (True for prompts).
    Returns:
        The ids of the rendered template, tokenized without added special tokens. When a message
        spells a special token, the conversation is tokenized piece by piece: template markup with
        special tokens recognised, message content with special tokens split. Otherwise the whole
        rendering is tokenized at once (identical to ``apply_chat_template(tokenize=True)`` for
        templates that carry their own BOS, and free of merges across piece boundaries).
        A template that rewrites message content (so pieces cannot be located) falls back to the
        whole rendering, with a warning when special-token text is then read as special tokens.
    """
    if not any(has_special_text(tokenizer, m["content"]) for m in messages):
        return _template_ids(tokenizer, _render(tokenizer, messages, add_generation_prompt))
    pieces = _segments(tokenizer, messages, add_generation_prompt)
    if pieces is None:
        log.warning("the chat template rewrites message content; text spelling special tokens is tokenized "
                    "as special tokens")
        return _template_ids(tokenizer, _render(tokenizer, messages, add_generation_prompt))
    ids: list[int] = []
    for text, is_content in pieces:
        ids += text_ids(tokenizer, text) if is_content else _template_ids(tokenizer, text)
    return ids


def end_of_turn_ids(tokenizer, messages: list[dict[str, str]] | None = None) -> list[int]:
    """Token ids the chat template writes after an assistant answer (``<|im_end|>\\n`` for ChatML,
    ``<|eot_id|>`` for Llama 3), i.e. what a finished answer ends with. Falls back to the EOS
    token when the template cannot be cut around the answer."""
    convo = list(messages or [{"role": "user", "content": "hi"}])
    mark = f"{_OPEN}answer{_CLOSE}"
    try:
        rendered = _render(tokenizer, convo + [{"role": "assistant", "content": mark}], False)
    except Exception:  # a template that refuses this conversation shape
        rendered = ""
    if rendered.count(mark) == 1:
        return _template_ids(tokenizer, rendered.split(mark, 1)[1])
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def stop_token_ids(model_dir: str | Path) -> set[int]:
    """Token ids that end generation for the model in ``model_dir``, as vLLM and transformers
    decide it: ``eos_token_id`` of ``generation_config.json`` and ``config.json`` (an int or a
    list) and the tokenizer's EOS token. Reads JSON only; an absent file contributes nothing."""
    folder = Path(model_dir)
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        f = folder / name
        if f.is_file():
            value: Any = json.loads(f.read_text()).get("eos_token_id")
            ids.update([value] if isinstance(value, int) else [int(v) for v in value or []])
    eos_text = None
    tc = folder / "tokenizer_config.json"
    if tc.is_file():
        eos_text = json.loads(tc.read_text()).get("eos_token")
        if isinstance(eos_text, dict):
            eos_text = eos_text.get("content")
    tj = folder / "tokenizer.json"
    if eos_text and tj.is_file():
        for tok in json.loads(tj.read_text()).get("added_tokens", []):
            if tok.get("content") == eos_text:
                ids.add(int(tok["id"]))
    return ids


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the token-id space (vocabulary with ids, special tokens): equal fingerprints mean
    token ids written with one tokenizer can be read with the other."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    payload = json.dumps({"vocab": vocab, "specials": _special_strings(tokenizer)}, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
