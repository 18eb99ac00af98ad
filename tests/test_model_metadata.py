"""Outside the engines and the training workers, a model is read through its metadata files only
(``models.model_metadata``): a hub id or ``s3://`` model never brings a weight file to the driver."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raydistill.chat import stop_token_ids
from raydistill.model_files import METADATA_FILES, is_metadata_file
from raydistill.models import ModelError, model_metadata

from .fake_hub import WEIGHT_SUFFIXES, serving, with_weights

REPO = "fake-org/tiny-chat"


def _weights_under(folder: Path) -> list[str]:
    return sorted(str(p) for p in Path(folder).rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def test_metadata_files_are_config_and_tokenizer_at_the_top_only():
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "tokenizer.model", "chat_template.jinja", "cl100k.tiktoken"):
        assert is_metadata_file(name), name
    for name in ("model.safetensors", "model-00001-of-00163.safetensors", "pytorch_model.bin", "optimizer.pt",
                 "model.gguf", "original/tokenizer.model", "original/consolidated.00.pth", "README.md",
                 "tokenization_custom.py", "model.safetensors.index.json"):
        assert not is_metadata_file(name), name
    assert "config.json" in METADATA_FILES


def test_a_hub_teacher_brings_only_its_metadata_to_the_driver(tiny_model, tmp_path, monkeypatch):
    """The job driver's steps on a hub-id teacher (stop ids, tokenizer fingerprint, prompt
    tokenizer) fetch config, generation config and tokenizer files, and no weight file."""
    from transformers import AutoTokenizer

    from raydistill.chat import tokenizer_fingerprint
    from raydistill.generate.common import model_stop_ids
    from raydistill.generate.vllm_engine import _PromptTokenizer

    repo = with_weights(tiny_model, tmp_path / "repo")
    cache = tmp_path / "hf-cache"
    with serving(monkeypatch, {REPO: repo}, cache) as hub:
        folder = model_metadata(REPO)
        stops = model_stop_ids(REPO)  # what generate's driver records and vLLM's rows are read with
        tok = AutoTokenizer.from_pretrained(folder)
        actor = _PromptTokenizer(REPO)  # the prompt tokenizer of generate and evaluate
        assert hub.requested, "nothing was fetched from the fake hub"
        assert hub.weights_requested() == [], hub.requested
    assert _weights_under(cache) == []
    assert sorted(p.name for p in folder.iterdir()) == sorted(f for f in set(hub.requested))
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(hub.requested)
    assert stops == stop_token_ids(tiny_model) and stops
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_model))
    assert tokenizer_fingerprint(actor.tokenizer) == tokenizer_fingerprint(tok)


def test_a_hub_teacher_to_prune_is_not_fetched_by_the_driver(tiny_model, tmp_path, monkeypatch):
    """student.init=prune: the driver's recipe of the baseline names a hub teacher by its id and
    fetches nothing (the pruning task fetches the weights on a worker)."""
    from raydistill.train.student import baseline_recipe, local_teacher_dir

    with serving(monkeypatch, {REPO: with_weights(tiny_model, tmp_path / "repo")}, tmp_path / "hf-cache") as hub:
        assert local_teacher_dir(REPO) is None
        assert baseline_recipe(REPO, None, None) == {"teacher": REPO, "teacher_weights": None, "keep_layers": None}
        assert hub.requested == []
    assert local_teacher_dir(str(tiny_model)) == str(tiny_model.resolve())
    assert local_teacher_dir("s3://bucket/teacher") is None


def test_an_unknown_hub_model_is_a_model_error(tmp_path, monkeypatch, tiny_model):
    with serving(monkeypatch, {REPO: tiny_model}, tmp_path / "hf-cache"):
        with pytest.raises(ModelError, match="fake-org/missing"):
            model_metadata("fake-org/missing")


def test_offline_without_the_model_in_the_cache_says_so(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelError, match=r"fake-org/not-cached.*local Hugging Face cache"):
        model_metadata("fake-org/not-cached")


def test_a_local_folder_is_read_in_place(tiny_model):
    assert model_metadata(str(tiny_model)) == Path(tiny_model).resolve()


def test_s3_model_brings_only_its_metadata_to_the_driver(tiny_model, tmp_path, s3_server):
    """An ``s3://`` student (what train writes to S3): evaluate's prompt tokenizer and the
    driver's checks copy its config and tokenizer files, not its weights or optimizer states."""
    from transformers import AutoTokenizer

    from raydistill.chat import tokenizer_fingerprint
    from raydistill.generate.vllm_engine import _PromptTokenizer
    from raydistill.storage import storage_path, upload_dir

    from .conftest import make_bucket

    uri = make_bucket("metadata-only") + "/run/student"
    upload_dir(with_weights(tiny_model, tmp_path / "student"), storage_path(uri))
    cache = tmp_path / "rd-cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAYDISTILL_CACHE", str(cache))
        folder = model_metadata(uri)
        actor = _PromptTokenizer(uri)
    assert _weights_under(cache) == [], _weights_under(cache)
    assert (folder / "config.json").is_file() and not (folder / "original").exists()
    assert json.loads((folder / "config.json").read_text())["vocab_size"] == \
        json.loads((tiny_model / "config.json").read_text())["vocab_size"]
    assert tokenizer_fingerprint(actor.tokenizer) == tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_model))
