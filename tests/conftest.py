"""Shared fixtures: a tiny random-weight chat model built on the spot (no downloads), a local
Ray instance, and temp/cache folders so vLLM and Ray leave nothing behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS_TEXT = [
    "The capital of France is Paris.", "Two plus three is five.", "The answer is 12.",
    "Summarize this dialogue: Ann wants tea. Bob makes tea.", "Premise: A dog runs. Hypothesis: An animal moves.",
    "entailment neutral contradiction", "Hello! How can I help you today?", "The sky is blue because of scattering.",
    "Give the final answer as a number.", "Tom has 12 apples and buys 7 more, so he has 19 apples.",
]


def build_tiny_model(folder: Path, num_layers: int = 4, seed: int = 0) -> Path:
    """A random-weight Llama (hidden 128, 2 heads of 64) with a byte-level BPE tokenizer trained
    here on a few sentences and a ChatML chat template; pad == eos == <|im_end|> like SmolLM2."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS_TEXT * 5, trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                     pad_token="<|im_end|>", unk_token="<|endoftext|>")
    hf_tok.chat_template = CHATML
    folder.mkdir(parents=True, exist_ok=True)
    hf_tok.save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(hf_tok), hidden_size=128, intermediate_size=256, num_hidden_layers=num_layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=hf_tok.bos_token_id,
                      eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-teacher")


@pytest.fixture(scope="session", autouse=True)
def _isolated_env(tmp_path_factory):
    """Point caches and temp folders of Ray, vLLM and raydistill at this session's temp dir."""
    base = tmp_path_factory.mktemp("env")
    saved = dict(os.environ)
    os.environ.update({
        "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
        "TOKENIZERS_PARALLELISM": "false", "VLLM_CACHE_ROOT": str(base / "vllm-cache"),
        "XDG_CACHE_HOME": str(base / "xdg-cache"),
    })
    # The embedded teacher is converted once per machine; tests reuse the user's cache if present.
    os.environ.setdefault("RAYDISTILL_CACHE", str(Path.home() / ".cache" / "raydistill"))
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One local Ray for the session (8 logical CPUs: the LLM processor's stage actors need them)."""
    import ray

    from raydistill.runtime import init_ray

    init_ray()
    yield ray
    ray.shutdown()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def mixed_prompts(n: int) -> list[dict]:
    """n prompts cycling over the five task types, each with a checkable reference."""
    tasks = ["math", "nli", "qa", "summarization", "conversation"]
    rows = []
    for i in range(n):
        task = tasks[i % 5]
        if task == "math":
            rows.append({"qid": f"q{i}", "kind": task, "question": f"What is {i} plus 3? Give the final answer as a number.",
                         "answer": str(i + 3)})
        elif task == "nli":
            rows.append({"qid": f"q{i}", "kind": task, "question": f"Premise: A dog runs {i} laps. Hypothesis: An animal moves. "
                         "Answer with one word: entailment, neutral, or contradiction.", "answer": "entailment"})
        else:
            rows.append({"qid": f"q{i}", "kind": task, "question": f"Tell me fact number {i} about Paris.",
                         "answer": "The capital of France is Paris."})
    return rows
