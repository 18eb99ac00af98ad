"""Report arithmetic and the peak-memory probe."""

import math

import numpy as np
import pyarrow as pa
import pytest

from raydistill.evaluate import memory_probe, model_report, retained
from raydistill.generate import engine_throughput
from raydistill.generate import GENERATED_SCHEMA


def _table(rows):
    base = {"messages": [{"role": "user", "content": "q"}], "split": "test", "finish_reason": "stop",
            "prompt_tokens": 3, "response_token_ids": [], "top_logprobs_ids": None, "top_logprobs": None,
            "error": None}
    return pa.Table.from_pylist([dict(base, **r) for r in rows], schema=GENERATED_SCHEMA)


def test_model_report_figures():
    t = _table([
        {"prompt_id": "a", "task": "math", "reference": "4", "response": "It is 4.", "response_tokens": 4,
         "latency_s": 1.0, "batch_id": "b1"},
        {"prompt_id": "b", "task": "math", "reference": "5", "response": "It is 6.", "response_tokens": 4,
         "latency_s": 2.0, "batch_id": "b1"},
        {"prompt_id": "c", "task": "qa", "reference": "Paris is the capital", "response": "Paris is the capital",
         "response_tokens": 8, "latency_s": 3.0, "batch_id": "b2"},
    ])
    teacher = _table([dict(r, response=a) for r, a in zip(t.to_pylist(), ["It is 4.", "It is 6.", "Lyon"])])
    rep = model_report(t, teacher)
    assert rep["metrics"]["math"] == {"accuracy": 0.5}
    assert rep["metrics"]["qa"]["rougeL"] == pytest.approx(1.0)
    assert rep["quality"] == pytest.approx((0.5 + 1.0) / 2)
    assert rep["agreement_rougeL"] == pytest.approx((1 + 1 + 0) / 3)
    assert rep["latency_ms_p50"] == pytest.approx(2000.0)
    assert rep["latency_ms_p95"] == pytest.approx(2900.0)  # linear interpolation between 2000 and 3000
    # 16 tokens over batch spans max(1, 2) + 3 = 5 s
    assert rep["output_tokens_per_s"] == pytest.approx(16 / 5)
    assert engine_throughput(t) == pytest.approx(3.2)


def test_retained_ratios_and_zero_teacher():
    teacher = {"metrics": {"math": {"accuracy": 0.0}, "qa": {"rougeL": 0.5, "bleu": 20.0}}, "quality": 0.25}
    student = {"metrics": {"math": {"accuracy": 0.0}, "qa": {"rougeL": 0.25, "bleu": 5.0}}, "quality": 0.125}
    r = retained(student, teacher)
    assert r == {"math.accuracy": None, "qa.rougeL": 0.5, "qa.bleu": 0.25, "quality": 0.5}


def test_memory_probe_is_not_inflated_by_a_large_parent(tiny_model):
    ballast = np.ones(1_500_000_000 // 8)  # 1.5 GB resident in this (parent) process
    assert ballast.sum() > 0
    # 300 long prompts: far more than the 128 KiB a single command-line argument may carry
    msgs = [[{"role": "user", "content": "Hello there " * 100}]] * 300
    out = memory_probe(str(tiny_model), msgs, 2)
    del ballast
    assert out["params"] > 0
    assert 50 < out["peak_memory_mb"] < 1400, out  # torch + a tiny model, not the parent's 1.5 GB
    assert math.isfinite(out["peak_memory_mb"])


def test_report_without_references_scores_agreement_only(tmp_path):
    from raydistill.evaluate import MODEL_NAMES, write_markdown, write_plots

    rows = [{"prompt_id": p, "task": "conversation", "reference": None, "response": r, "response_tokens": 3,
             "latency_s": lat, "batch_id": "b"} for p, r, lat in (("a", "hello there friend", 1.0),
                                                                   ("b", "good day", 2.0))]
    answers = {"teacher": _table(rows), "baseline_student": _table([dict(r, response="zz") for r in rows]),
               "student": _table([dict(r, response="hello friend") for r in rows])}
    models = {n: dict(model_report(answers[n], answers["teacher"]), peak_memory_mb=100.0, params=10, size_mb=1.0)
              for n in MODEL_NAMES}
    assert models["teacher"]["metrics"] == {} and models["teacher"]["quality"] is None
    assert models["student"]["agreement_rougeL"] > models["baseline_student"]["agreement_rougeL"] == 0.0
    report = {"split": "test", "prompts": 2, "teacher": "t", "engine": "hf", "models": models,
              "retained": retained(models["student"], models["teacher"]),
              "retained_baseline": retained(models["baseline_student"], models["teacher"])}
    assert report["retained"] == {"quality": None}
    write_markdown(report, answers, tmp_path / "report.md")
    pngs = write_plots(report, tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "| agreement with teacher (ROUGE-L, 0–1) | 1.000 | 0.000 |" in text and "n/a" in text
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_failed_rows_are_left_out_of_every_figure():
    ok = {"prompt_id": "a", "task": "nli", "reference": "entailment", "response": "entailment",
          "response_tokens": 2, "latency_s": 1.0, "batch_id": "b"}
    bad = {"prompt_id": "z", "task": "nli", "reference": "neutral", "response": "", "response_tokens": 0,
           "latency_s": None, "batch_id": "", "error": "prompt too long", "finish_reason": "error"}
    model = _table([ok, bad])
    rep = model_report(model, model)
    assert rep["errors"] == 1 and rep["answers"] == 1
    assert rep["metrics"]["nli"] == {"accuracy": 1.0}  # not 0.5: the failed row is no wrong answer
    assert rep["agreement_rougeL"] == pytest.approx(1.0)  # the teacher agrees with itself
    assert rep["mean_output_tokens"] == 2.0 and rep["latency_ms_p95"] == pytest.approx(1000.0)
