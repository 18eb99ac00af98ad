"""Logit KD training end to end on the tiny model: from the corpus's top-k logprobs and from an
online teacher, the refused vocabulary mismatch and corpus without logprobs, gradient
accumulation equal to a bigger batch, FSDP export, and packing.

The corpus here is the tiny teacher's own answers (greedy ids) with its real top-k logprobs,
computed with a plain transformers forward: what generate writes, without running an engine."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from raydistill.train.stage import run_train
from raydistill.train.student import VocabularyMismatch

from .conftest import build_tiny_model
from .helpers import TOP_K, assert_same_weights, kd_config, write_corpus, write_topk_corpus


def _metrics(cfg) -> list[dict]:
    return [json.loads(x) for x in (Path(cfg.output_dir) / "train" / "metrics.jsonl").read_text().splitlines()]


def _state(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()


def test_the_corpus_helper_writes_the_teachers_top_k(tiny_model, tmp_path):
    """The helper's rows are what generate writes: ids and top-k aligned, top-1 = the greedy id."""
    from raydistill.schema import CORPUS_SCHEMA, validate

    cfg = kd_config(tmp_path, tiny_model, 12)
    rows = write_topk_corpus(cfg, tiny_model)
    validate(pq.read_table(Path(cfg.output_dir) / "corpus" / "data"), CORPUS_SCHEMA, "corpus")
    eos = json.loads((Path(cfg.output_dir) / "corpus" / "manifest.json").read_text())["stop_token_ids"][0]
    assert {r["finish_reason"] for r in rows} == {"stop", "length"}
    for r in rows:
        ids = r["response_token_ids"]
        assert len(r["top_logprobs_ids"]) == len(r["top_logprobs"]) == len(ids) == r["response_tokens"]
        assert all(len(x) == TOP_K and x == sorted(x, reverse=True) and x[0] <= 0 for x in r["top_logprobs"])
        greedy = ids[:-1] if r["finish_reason"] == "stop" else ids
        assert [x[0] for x in r["top_logprobs_ids"][:len(greedy)]] == greedy
        assert (ids[-1] == eos) == (r["finish_reason"] == "stop")


def test_logit_kd_from_the_corpus_trains_and_reports_its_parts(tiny_model, tmp_path, ray_local):
    from transformers import AutoModelForCausalLM

    # alpha=1 (KD alone): the random teacher's top-5 are nearly flat, so the cross-entropy on its
    # greedy ids (alpha < 1) sharpens the student away from them and KD rises while CE falls.
    cfg = kd_config(tmp_path, tiny_model, 24, ["train.kd.alpha=1.0"])
    write_topk_corpus(cfg, tiny_model)
    summary = run_train(cfg)
    out = Path(cfg.output_dir)
    assert summary["loss"] == "logit_kd" and summary["label_source"] == "teacher_token_ids"
    assert summary["kd"]["divergence"] == "forward_kl" and summary["kd"]["teacher"] == "corpus"
    metrics = _metrics(cfg)
    assert len(metrics) == summary["steps"] >= 8
    for m in metrics:
        assert isinstance(m["ce"], float) and isinstance(m["kd"], float), m
        assert math.isfinite(m["ce"]) and math.isfinite(m["kd"]) and m["kd"] >= 0
        assert m["loss"] == pytest.approx(m["kd"], abs=1e-5)  # alpha=1
    # the student moved toward the teacher: per-epoch means (each epoch sees every row once; single
    # steps swing with their batch) and the validation loss (KD alone on fixed rows) both fell
    per_epoch = summary["steps"] // 4
    kd = [sum(m["kd"] for m in metrics[e * per_epoch:(e + 1) * per_epoch]) / per_epoch for e in range(4)]
    assert kd[-1] < kd[0] * 0.5, kd
    val = [m["val_loss"] for m in metrics if m.get("val_loss") is not None]
    assert len(val) == 4 and all(math.isfinite(v) for v in val) and val[-1] < val[0] * 0.8, val
    assert (out / "train" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    student = AutoModelForCausalLM.from_pretrained(out / "student")
    assert student.config.num_hidden_layers == 2


def test_online_teacher_logit_kd_with_packing_under_fsdp(tiny_model, tmp_path, ray_local):
    """kd.teacher=online (full-vocabulary teacher logits in the worker), with jsd, over packed rows,
    with strategy=fsdp on 2 CPU workers (gloo, FSDP2): the packed examples are fewer than the
    corpus's train rows, every answer token is trained once per epoch, and the gathered student
    loads with from_pretrained with every parameter moved from the baseline."""
    cfg = kd_config(tmp_path, tiny_model, 24, ["train.kd.teacher=online", "train.kd.divergence=jsd",
                                               "train.packing=true", "train.epochs=2", "train.strategy=fsdp",
                                               "train.workers=2"])
    rows = write_topk_corpus(cfg, tiny_model)
    n_train = sum(r["split"] == "train" for r in rows)
    summary = run_train(cfg)
    assert summary["kd"]["teacher"] == "online" and summary["kd"]["divergence"] == "jsd"
    assert 0 < summary["examples"] < n_train  # packed: several answers per row
    assert summary["dropped"]["too_long"] == 0
    metrics = _metrics(cfg)
    assert len(metrics) == summary["steps"] > 0
    assert all(isinstance(m["kd"], float) and math.isfinite(m["kd"]) and m["kd"] >= 0 for m in metrics), metrics
    # every answer token was trained once per epoch, packed or not
    from transformers import AutoTokenizer

    from raydistill.chat import end_of_turn_ids

    tok = AutoTokenizer.from_pretrained(tiny_model)
    eot = len(end_of_turn_ids(tok))
    want = sum(r["response_tokens"] - 1 + eot if r["finish_reason"] == "stop" else r["response_tokens"]
               for r in rows if r["split"] == "train")
    per_epoch = summary["steps"] // 2
    assert sum(m["tokens"] for m in metrics[:per_epoch]) == want
    # FSDP: the student gathered from the shards loads, and every parameter moved
    out = Path(cfg.output_dir)
    student, baseline = _state(out / "student"), _state(out / "baseline_student")
    assert student.keys() == baseline.keys()
    unchanged = [n for n in student if torch.equal(student[n], baseline[n])]
    assert unchanged == [], unchanged


@pytest.mark.parametrize("teacher", ["corpus", "online"])
def test_vocabulary_mismatch_is_refused_before_training(tiny_model, tmp_path, teacher):
    other = build_tiny_model(tmp_path / "other-vocab", num_layers=2, seed=1, vocab_size=300)
    cfg = kd_config(tmp_path, tiny_model, 12, ["student.init=pretrained", f"student.model={other}",
                                               f"train.kd.teacher={teacher}"])
    write_topk_corpus(cfg, tiny_model)
    from transformers import AutoTokenizer

    n_teacher, n_student = len(AutoTokenizer.from_pretrained(tiny_model)), len(AutoTokenizer.from_pretrained(other))
    assert n_teacher != n_student
    with pytest.raises(VocabularyMismatch) as e:
        run_train(cfg)
    msg = str(e.value)
    assert f"has {n_teacher} tokens" in msg and f"the student's has {n_student}" in msg, msg
    assert "train.loss=sequence_kd" in msg
    assert not (Path(cfg.output_dir) / "train" / "ray").exists()  # Ray Train never started


def test_logit_kd_without_logprobs_says_to_regenerate(tiny_model, tmp_path):
    cfg = kd_config(tmp_path, tiny_model, 12)
    write_corpus(cfg, n=12, answered=None, varied=True)  # no top-k, no generation_params
    with pytest.raises(ValueError, match=r"generation\.top_k_logprobs") as e:
        run_train(cfg)
    assert not isinstance(e.value, VocabularyMismatch)
    assert "regenerate" in str(e.value) and "train.loss=sequence_kd" in str(e.value)
    assert not (Path(cfg.output_dir) / "train" / "ray").exists()


@pytest.mark.slow
def test_gradient_accumulation_equals_a_bigger_batch(tiny_model, tmp_path, ray_local):
    """8 train rows, one worker: batch 8 × 1 and batch 1 × 8 both make one optimizer step per
    epoch over the same rows; the step loss is a token mean, so losses and weights agree.
    Through Ray Train and the corpus (slow: two runs); the loop alone, in the default run:
    tests/test_train_loop.py::test_gradient_accumulation_equals_a_bigger_batch_in_the_loop."""
    sets = ["data.split.validation=0", "data.split.test=0", "train.epochs=3", "train.lr=1e-2",
            "train.warmup_ratio=0"]
    big = kd_config(tmp_path / "big", tiny_model, 8, sets + ["train.batch_size=8", "train.grad_accum_steps=1"])
    rows = write_topk_corpus(big, tiny_model)
    assert len(rows) == 8 and all(r["split"] == "train" for r in rows)
    small = kd_config(tmp_path / "small", tiny_model, 8, sets + ["train.batch_size=1", "train.grad_accum_steps=8"])
    write_topk_corpus(small, tiny_model)
    a, b = run_train(big), run_train(small)
    assert a["steps"] == b["steps"] == 3 and a["examples"] == b["examples"] == 8
    ma, mb = _metrics(big), _metrics(small)
    for x, y in zip(ma, mb):
        assert x["tokens"] == y["tokens"]
        for key in ("loss", "ce", "kd"):
            assert y[key] == pytest.approx(x[key], rel=1e-4), (key, x, y)
    assert ma[-1]["loss"] < ma[0]["loss"]  # the rate mattered
    sa, sb = _state(Path(big.output_dir) / "student"), _state(Path(small.output_dir) / "student")
    assert_same_weights(sa, sb)
