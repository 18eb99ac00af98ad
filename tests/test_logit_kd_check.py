"""The logit-KD vocabulary check runs before training for every kind of model reference: a local
folder, ``embedded:``, a hub id and ``s3://`` (read through ``models.model_metadata``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from raydistill.train.stage import run_train
from raydistill.train.student import VocabularyMismatch

from .fake_hub import serving, with_weights
from .helpers import kd_config

HUB_STUDENT = "fake-org/narrow-student"


def narrow_student(tiny_model: Path, folder: Path, rows: int) -> Path:
    """A real tiny Llama with the teacher's tokenizer but an embedding matrix of only ``rows`` rows
    (fewer than the tokenizer's tokens): the teacher's top ids past ``rows - 1`` have no student
    logit. Only a check that reads the student's config.json can tell."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shutil.copytree(tiny_model, folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    cfg = json.loads((tiny_model / "config.json").read_text())
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**dict(cfg, vocab_size=rows, num_hidden_layers=1))).save_pretrained(folder)
    return folder


def write_manifest(cfg, teacher_dir: Path) -> None:
    """The manifest of a finished top-k corpus made by ``teacher_dir`` (what generate records for
    logit KD: the teacher's tokenizer fingerprint and size, ``generation.top_k_logprobs``). No
    shards: the checks under test come before any row is read."""
    from transformers import AutoTokenizer

    from raydistill.chat import tokenizer_fingerprint
    from raydistill.schema import SCHEMA_VERSION

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    corpus = Path(cfg.output_dir) / "corpus"
    corpus.mkdir(parents=True)
    (corpus / "manifest.json").write_text(json.dumps({
        "schema_version": SCHEMA_VERSION, "rows": 0, "shards": [], "teacher": cfg.teacher.model,
        "teacher_tokenizer": tokenizer_fingerprint(tok), "teacher_vocab_size": len(tok),
        "stop_token_ids": [tok.eos_token_id], "generation_params": cfg.generation.model_dump()}))


def _refused(cfg) -> str:
    with pytest.raises(VocabularyMismatch) as e:
        run_train(cfg)
    assert not (Path(cfg.output_dir) / "train" / "ray").exists()  # Ray Train never started
    return str(e.value)


def _n_tokens(model) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(model))


@pytest.mark.parametrize("kind", ["local", "hub"])
def test_a_student_embedding_smaller_than_the_teachers_ids_is_refused(tiny_model, tmp_path, monkeypatch, kind):
    """Same tokenizer (the teacher's own ids are trained), student embedding 50 rows short."""
    n = _n_tokens(tiny_model)
    student = narrow_student(tiny_model, tmp_path / "student", n - 50)
    ref = str(student) if kind == "local" else HUB_STUDENT
    cfg = kd_config(tmp_path / "run", tiny_model, 12, ["student.init=pretrained", f"student.model={ref}"])
    write_manifest(cfg, tiny_model)
    if kind == "local":
        msg = _refused(cfg)
    else:
        with serving(monkeypatch, {HUB_STUDENT: with_weights(student, tmp_path / "repo")}, tmp_path / "hf") as hub:
            msg = _refused(cfg)
        assert hub.requested and hub.weights_requested() == [], hub.requested
    assert f"the teacher's tokenizer has {n} tokens but the student's embedding matrix only {n - 50} rows" in msg, msg
    assert "train.loss=sequence_kd" in msg


def test_an_online_hub_teacher_is_checked_too(tiny_model, tmp_path, monkeypatch):
    """kd.teacher=online with the teacher a hub id: its tokenizer and embedding size come from its
    metadata files (before: only a teacher already in the local HF cache was checked)."""
    n = _n_tokens(tiny_model)
    student = narrow_student(tiny_model, tmp_path / "student", n - 50)
    cfg = kd_config(tmp_path / "run", tiny_model, 12, ["student.init=pretrained", f"student.model={student}",
                                                       "train.kd.teacher=online"])
    write_manifest(cfg, tiny_model)
    cfg = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"model": "fake-org/teacher"})})
    with serving(monkeypatch, {"fake-org/teacher": with_weights(tiny_model, tmp_path / "repo")}, tmp_path / "hf") as hub:
        msg = _refused(cfg)
    assert hub.weights_requested() == [], hub.requested
    assert f"the teacher's tokenizer (fake-org/teacher) has {n} tokens" in msg and f"({n - 50} rows" in msg.replace(
        "embedding matrix: ", ""), msg


def test_an_embedded_student_with_another_vocabulary_is_refused(tiny_model, tmp_path):
    """``embedded:SmolLM2-135M-Instruct`` (49152 tokens) against the tiny teacher's corpus."""
    cfg = kd_config(tmp_path / "run", tiny_model, 12, ["student.init=pretrained",
                                                       "student.model=embedded:SmolLM2-135M-Instruct"])
    write_manifest(cfg, tiny_model)
    msg = _refused(cfg)
    assert f"has {_n_tokens(tiny_model)} tokens, the student's has 49152" in msg, msg


def test_an_s3_student_is_checked_from_its_metadata(tiny_model, tmp_path, s3_server):
    from raydistill.storage import storage_path, upload_dir

    from .conftest import make_bucket

    n = _n_tokens(tiny_model)
    uri = make_bucket("kd-check") + "/students/narrow"
    upload_dir(with_weights(narrow_student(tiny_model, tmp_path / "student", n - 50), tmp_path / "up"),
               storage_path(uri))
    cfg = kd_config(tmp_path / "run", tiny_model, 12, ["student.init=pretrained", f"student.model={uri}"])
    write_manifest(cfg, tiny_model)
    msg = _refused(cfg)
    assert f"the student's embedding matrix only {n - 50} rows" in msg, msg
