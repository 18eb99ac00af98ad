"""Report arithmetic and building, on synthetic answer tables (no engines), and the memory probe."""

import json
import math

import numpy as np
import pyarrow as pa
import pytest

from raydistill.evaluate.figures import (
    MODEL_NAMES,
    degeneracy,
    model_report,
    ratio_spread,
    repetition,
    retained,
    timing_ratios,
)
from raydistill.evaluate.probes import memory_probe, model_files
from raydistill.evaluate.render import write_report
from raydistill.evaluate.report import build_report
from raydistill.evaluate.rounds import split_rounds
from raydistill.generate import GENERATED_SCHEMA, engine_throughput


def _table(rows, rounds=None):
    base = {"messages": [{"role": "user", "content": "q"}], "split": "test", "finish_reason": "stop",
            "prompt_tokens": 3, "response_token_ids": [], "top_logprobs_ids": None, "top_logprobs": None,
            "error": None}
    table = pa.Table.from_pylist([dict(base, **r) for r in rows], schema=GENERATED_SCHEMA)
    if rounds is not None:
        table = table.append_column("round", pa.array(rounds, pa.int32()))
    return table


def _info(**over):
    """Probe and size figures of one model, as run_evaluate collects them."""
    return dict({"params": 1_000_000, "dtype": "float32", "device": "cpu", "model_memory_mb": 40.0,
                 "process_baseline_mb": 500.0, "peak_memory_mb": 540.0, "size_mb": 4.0, "size_dtype": "float32",
                 "path": "/m", "batch": 2}, **over)


def _report(answers, info=None, **kw):
    args = dict(split="test", teacher="t", engine="hf", label_map=None, max_ratio_spread=0.25,
                warn_retained_below=0.5)
    args.update(kw)
    return build_report(answers, info or {n: _info() for n in MODEL_NAMES}, **args)


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
    # "It is 4." states no final answer: a lenient hit, a strict miss; quality uses strict accuracy
    assert rep["metrics"]["math"] == {"accuracy": 0.0, "accuracy_lenient": 0.5}
    assert rep["metrics"]["qa"]["rougeL"] == pytest.approx(1.0)
    assert rep["quality"] == pytest.approx((0.0 + 1.0) / 2)
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


def test_retained_uses_strict_math_accuracy():
    """A student that lists numbers ("2 4 6 ... 14") without stating an answer keeps nothing of the
    teacher's strict accuracy, though the lenient reading scores it as good as the teacher."""
    rows = [{"prompt_id": f"p{i}", "task": "math", "reference": "14", "response_tokens": 4, "latency_s": 1.0,
             "batch_id": "b"} for i in range(2)]
    teacher = _table([dict(r, response="7 + 7 = 14.\n#### 14") for r in rows])
    student = _table([dict(r, response="2 4 6 8 10 12 14") for r in rows])
    t, s = model_report(teacher, teacher), model_report(student, teacher)
    assert s["metrics"]["math"] == {"accuracy": 0.0, "accuracy_lenient": 1.0}
    assert retained(s, t) == {"math.accuracy": 0.0, "quality": 0.0}


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


def _rows(n, task="qa", **over):
    """n answered rows, each a different answer, latency 1.0, 1.1, ... s, one batch each."""
    return [dict({"prompt_id": f"p{i}", "task": task, "reference": "Paris is the capital of France.",
                  "response": f"Paris is the capital of France, fact {i}.", "response_tokens": 6,
                  "latency_s": 1.0 + i / 10, "batch_id": f"b{i}"}, **over) for i in range(n)]


def test_model_report_ending_and_per_token_latency():
    rows = [{"prompt_id": "a", "task": "qa", "reference": "x", "response": "a b", "response_tokens": 4,
             "latency_s": 2.0, "batch_id": "b1", "finish_reason": "stop"},
            {"prompt_id": "b", "task": "qa", "reference": "x", "response": "a b c", "response_tokens": 10,
             "latency_s": 2.0, "batch_id": "b1", "finish_reason": "length"},
            {"prompt_id": "c", "task": "qa", "reference": "x", "response": "d", "response_tokens": 10,
             "latency_s": 4.0, "batch_id": "b2", "finish_reason": "length"}]
    rep = model_report(_table(rows), _table(rows))
    assert rep["finish_stop_share"] == pytest.approx(1 / 3) and rep["finish_length_share"] == pytest.approx(2 / 3)
    assert rep["mean_output_tokens"] == pytest.approx(8.0)
    # ms per token per answer: 500, 200, 400 -> median 400
    assert rep["latency_ms_per_token_p50"] == pytest.approx(400.0)
    assert rep["unscorable"] == {}


def test_memory_probe_separates_model_from_process_baseline(tiny_model):
    ballast = np.ones(1_500_000_000 // 8)  # 1.5 GB resident in this (parent) process
    assert ballast.sum() > 0
    # 300 long prompts: far more than the 128 KiB a single command-line argument may carry
    msgs = [[{"role": "user", "content": "Hello there " * 100}]] * 300
    out = memory_probe(str(tiny_model), msgs, 2, dtype="bfloat16", device="cpu")
    del ballast
    assert out["params"] > 0 and out["dtype"] == "bfloat16" and out["device"] == "cpu" and out["batch"] == 2
    # the baseline is torch + transformers (hundreds of MB), not the parent's 1.5 GB
    assert 100 < out["process_baseline_mb"] < 1400, out
    assert out["model_memory_mb"] == pytest.approx(out["peak_memory_mb"] - out["process_baseline_mb"], abs=0.2)
    # a tiny model (~0.1M params, 2 long prompts) is tens of MB of its own, not the interpreter's hundreds
    assert 0 <= out["model_memory_mb"] < 300, out
    assert all(math.isfinite(out[k]) for k in ("peak_memory_mb", "model_memory_mb", "process_baseline_mb"))


def test_quality_gate_names_what_fell_short_and_needs_a_measured_quality(tmp_path):
    from raydistill.evaluate.report import gate_failure, quality_gate

    assert quality_gate({"quality": 0.5}, None) is None
    ok = quality_gate({"quality": 0.95, "qa.f1": 0.9, "nli.accuracy": None}, 0.9)
    assert ok == {"min_retained": 0.9, "passed": True, "short": {}, "unmeasured": ["nli.accuracy"]}
    short = quality_gate({"quality": 0.95, "qa.f1": 0.41, "math.accuracy": 0.2}, 0.9)
    assert short["passed"] is False and short["short"] == {"qa.f1": 0.41, "math.accuracy": 0.2}
    assert gate_failure({"gate": short, "retained": {"quality": 0.95}}) == (
        "quality gate failed: the student retains less than eval.min_retained=0.9 of the teacher: "
        "qa.f1 0.410, math.accuracy 0.200")
    unmeasured = quality_gate({"quality": None, "qa.f1": 0.95}, 0.9)
    assert unmeasured["passed"] is False and unmeasured["unmeasured"] == ["quality"]
    assert "quality not measured" in gate_failure({"gate": unmeasured, "retained": {"quality": None}})
    assert gate_failure({"gate": ok, "retained": {}}) is None and gate_failure({"gate": None}) is None
    # the report carries it, report.md says it first
    rows = _rows(2)
    report = _report({n: _table(rows, [0, 1]) for n in MODEL_NAMES}, min_retained=0.5)
    assert report["gate"] == quality_gate(report["retained"], 0.5)
    write_report(tmp_path, report, {n: _table(rows, [0, 1]) for n in MODEL_NAMES})
    md = (tmp_path / "report.md").read_text()
    assert md.splitlines()[2].startswith("Quality gate (`eval.min_retained` = 0.5): ")


def test_compare_to_reads_another_runs_report_and_sets_the_students_side_by_side(tmp_path):
    from raydistill.config import load
    from raydistill.evaluate.report import COMPARED_FIGURES, other_report

    rows = _rows(2)
    answers = {n: _table(rows, [0, 1]) for n in MODEL_NAMES}
    before = _report(answers)
    before["retained"]["old.metric"] = 0.5  # a figure only the other run has
    (tmp_path / "old" / "eval").mkdir(parents=True)
    (tmp_path / "old" / "eval" / "report.json").write_text(json.dumps(before))
    assert other_report(load(None, [f"output_dir={tmp_path / 'new'}"])) is None
    for ref in ("old", "old/eval", "old/eval/report.json"):  # the run, its eval/ folder or the file
        got = other_report(load(None, [f"eval.compare_to={tmp_path / ref}"]))
        assert got == (str(tmp_path / "old" / "eval" / "report.json"), before)
    with pytest.raises(FileNotFoundError, match="eval.compare_to: no report.json at"):
        other_report(load(None, [f"eval.compare_to={tmp_path / 'nowhere'}"]))
    (tmp_path / "bad.json").write_text("{}")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "report.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="is not a raydistill report.json"):
        other_report(load(None, [f"eval.compare_to={tmp_path / 'bad'}"]))

    report = _report(answers, compare_to=("s3://b/old/eval/report.json", before))
    comp = report["comparison"]
    assert comp["report"] == "s3://b/old/eval/report.json" and set(comp["student"]) == set(COMPARED_FIGURES)
    assert comp["student"]["quality"] == {"this": report["models"]["student"]["quality"],
                                          "other": before["models"]["student"]["quality"]}
    assert comp["retained"]["old.metric"] == {"this": None, "other": 0.5}
    assert set(comp["retained"]) == set(report["retained"]) | {"old.metric"}
    write_report(tmp_path, report, answers)
    md = (tmp_path / "report.md").read_text()
    assert "## Compared with another run (`s3://b/old/eval/report.json`)" in md
    assert "| retained old.metric | n/a | 0.500 |" in md
    assert _report(answers)["comparison"] is None


def test_memory_probe_false_keeps_the_size_and_loads_nothing(tiny_model, monkeypatch):
    """eval.memory_probe=false: no probe process; parameters and memory null, with the reason in a
    note (a report warning); the size on disk is still read from the files."""
    from raydistill.config import EngineConfig, load
    from raydistill.evaluate import probes

    def no_probe(*args, **kwargs):
        raise AssertionError("the probe ran")

    monkeypatch.setattr(probes, "memory_probe", no_probe)
    info = probes.model_info(str(tiny_model), EngineConfig(engine="hf"), [[{"role": "user", "content": "Hi"}]], 1,
                             probe=False)
    assert info["size_mb"] == model_files(str(tiny_model))[0] > 0
    assert "params" not in info and "peak_memory_mb" not in info
    assert info["note"] == "memory and parameter figures are null: eval.memory_probe is false"
    assert load(None, ["eval.memory_probe=false"]).eval.memory_probe is False


def test_model_files_local_folder_and_uncached_hub_id(tiny_model):
    size, dtype = model_files(str(tiny_model))
    assert size == pytest.approx(sum(f.stat().st_size for f in tiny_model.glob("*.safetensors")) / 1e6, abs=0.01)
    assert dtype == "float32"
    assert model_files("some-org/no-such-model-cached") == (None, None)  # HF_HUB_OFFLINE: no download


def test_model_with_no_answer_gives_strict_json_nulls_md_and_plots(tmp_path):
    """eval.max_model_len too small for one model: every row failed; the report is still written."""
    ok = _rows(4)
    failed = [dict(r, response="", response_tokens=0, latency_s=None, batch_id="", finish_reason="error",
                   error="prompt has 30 tokens; max_model_len 24 - max_new_tokens 8 = 16") for r in ok]
    rounds = [0, 1, 0, 1]
    answers = {"teacher": _table(ok, rounds), "baseline_student": _table(failed, rounds),
               "student": _table(ok, rounds)}
    report = _report(answers)
    text = json.dumps(report, allow_nan=False)  # strict JSON: no NaN anywhere
    back = json.loads(text)["models"]["baseline_student"]
    for key in ("quality", "agreement_rougeL", "latency_ms_p50", "latency_ms_p95", "latency_ms_per_token_p50",
                "output_tokens_per_s", "mean_output_tokens", "finish_stop_share", "repetitive_share"):
        assert back[key] is None, key
    assert back["answers"] == 0 and back["errors"] == 4
    assert report["compared_to_teacher"]["baseline_student"]["latency_ms_p50"]["median"] is None
    assert report["compared_to_teacher"]["student"]["latency_ms_p50"]["median"] == pytest.approx(1.0)
    assert report["warnings"] == ["baseline_student answered none of the 4 prompts (all failed, e.g. prompt has 30 "
                                  "tokens; max_model_len 24 - max_new_tokens 8 = 16): its figures are null"]
    write_report(tmp_path, report, answers)
    assert json.loads((tmp_path / "report.json").read_text())["models"]["baseline_student"]["latency_ms_p50"] is None
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# raydistill evaluation report\n\n## Warnings\n")
    assert "| latency p50 per answer (ms) | 1,150.0 | n/a | 1,150.0 |" in md
    assert "(failed: prompt has 30 tokens" in md
    for png in ("quality_vs_latency.png", "agreement.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_hub_id_teacher_without_local_folder_has_null_size(tmp_path):
    rows = _rows(3)
    answers = {n: _table(rows) for n in MODEL_NAMES}
    size, dtype = model_files("HuggingFaceTB/not-in-this-cache")
    info = {"teacher": _info(size_mb=size, size_dtype=dtype, path="HuggingFaceTB/not-in-this-cache", params=None,
                             model_memory_mb=None, process_baseline_mb=None, peak_memory_mb=None,
                             note="memory and parameter figures are null: memory probe failed for x: offline"),
            "baseline_student": _info(params=500_000), "student": _info(params=500_000, dtype="bfloat16")}
    report = _report(answers, info)
    t = report["models"]["teacher"]
    assert t["size_mb"] is None and t["size_dtype"] is None and t["size_mb_eval_dtype"] is None
    assert report["compared_to_teacher"]["student"]["params"] is None
    assert report["models"]["student"]["size_mb_eval_dtype"] == pytest.approx(1.0)  # 500k params x 2 bytes
    assert "teacher: memory and parameter figures are null: memory probe failed for x: offline" in report["warnings"]
    write_report(tmp_path, report, answers)
    md = (tmp_path / "report.md").read_text()
    assert "| size on disk as stored (MB) | n/a | 4.0 | 4.0 |" in md
    assert "| size in eval dtype (MB) | n/a | 2.0 | 1.0 |" in md
    assert "- Parameters: n/a× the teacher's; size in the eval dtype n/a×; model memory n/a×" in md
    json.dumps(report, allow_nan=False)


def test_size_ratio_compares_one_dtype():
    """A bf16-stored student is not 'half the size' because of its dtype: the ratio uses params x eval bytes."""
    answers = {n: _table(_rows(2)) for n in MODEL_NAMES}
    info = {"teacher": _info(params=4_000_000, size_mb=8.0, size_dtype="bfloat16"),
            "baseline_student": _info(params=2_000_000, size_mb=8.0),
            "student": _info(params=2_000_000, size_mb=4.0, size_dtype="bfloat16")}
    report = _report(answers, info)
    assert report["models"]["teacher"]["size_mb_eval_dtype"] == pytest.approx(16.0)
    assert report["compared_to_teacher"]["student"]["size_mb_eval_dtype"] == pytest.approx(0.5)
    assert report["compared_to_teacher"]["student"]["params"] == pytest.approx(0.5)


def test_repetition_of_one_answer():
    digits = [5, 6, 7] + [0] * 40  # "The answer is 1000000..." (digit tokens)
    cov, run = repetition(digits)
    assert cov == pytest.approx(40 / 43) and run == 40
    cov, run = repetition(["the", "cat", "sat", "on", "the", "mat"])
    assert cov == 0.0 and run == 1  # "the" twice is no repetition
    cov, run = repetition("a b c a b c a b c a b c".split())  # a 3-gram repeated 4 times back to back
    assert cov == pytest.approx(1.0) and run == 4
    assert repetition([]) == (0.0, 0)


def test_degenerate_output_is_flagged_in_report_and_markdown(tmp_path):
    n = 6
    teacher = [dict(r, response=f"The answer is {i}.", response_token_ids=[1, 2, 3, 10 + i], task="math",
                    reference=str(i)) for i, r in enumerate(_rows(n))]
    same = [dict(r, response="The answer is 1000000000000000", response_token_ids=[1, 2, 3, 4] + [0] * 15)
            for r in teacher]
    # the baseline says the same short sentence to every prompt (no repetition inside an answer)
    parrot = [dict(r, response="I do not know.", response_token_ids=[7, 8, 9]) for r in teacher]
    answers = {"teacher": _table(teacher), "baseline_student": _table(parrot), "student": _table(same)}
    report = _report(answers)
    s, b, t = (report["models"][k] for k in ("student", "baseline_student", "teacher"))
    assert s["repetitive_share"] == 1.0 and s["max_repeat_run"] == 15 and s["degenerate"] is True
    assert b["repetitive_share"] == 0.0 and b["identical_share"] == 1.0 and b["degenerate"] is True
    assert t["degenerate"] is False and t["identical_share"] == 0.0
    w = report["warnings"]
    assert any(x.startswith("student: degenerate output: 100% of answers repeat one token sequence") for x in w), w
    assert any(x.startswith("baseline_student: degenerate output: 100% of answers are the same text") for x in w), w
    # quality retained 0 (student scores 0 of the teacher's 1.0): below eval.warn_retained_below
    assert report["retained"]["quality"] == 0.0
    assert any(x.startswith("student retains 0.000 of the teacher's quality, below eval.warn_retained_below (0.5)")
               for x in w), w
    write_report(tmp_path, report, answers)
    md = (tmp_path / "report.md").read_text()
    head = md.split("## Summary")[0]
    assert "## Warnings" in head and "student: degenerate output" in head and "student retains 0.000" in head
    assert "| degenerate output | no | yes | yes |" in md


def test_label_answers_may_repeat_without_a_degenerate_flag():
    rows = [dict(r, task="nli", reference="entailment", response="entailment") for r in _rows(8)]
    d = degeneracy(rows)
    assert d["identical_share"] is None and d["degenerate"] is False  # NLI answers are labels


def test_finish_shares_in_report_and_length_warning(tmp_path):
    teacher = [dict(r, finish_reason="stop" if i % 2 else "length") for i, r in enumerate(_rows(4))]
    student = [dict(r, finish_reason="length", response_tokens=64) for r in _rows(4)]
    answers = {"teacher": _table(teacher), "baseline_student": _table(teacher), "student": _table(student)}
    report = _report(answers)
    assert report["models"]["teacher"]["finish_stop_share"] == 0.5
    assert report["models"]["student"]["finish_length_share"] == 1.0
    assert report["models"]["student"]["mean_output_tokens"] == 64.0
    assert any(w.startswith("student: 100% of answers ran to the token limit (teacher: 50%)")
               for w in report["warnings"]), report["warnings"]
    write_report(tmp_path, report, answers)
    md = (tmp_path / "report.md").read_text()
    assert "| ended by themselves (finish stop) | 50% | 50% | 0% |" in md
    assert "| hit the token limit (finish length) | 50% | 50% | 100% |" in md
    assert "| mean answer length (tokens) | 6.0 | 6.0 | 64.0 |" in md
    assert "latency p50 per output token (ms/token)" in md


def test_ratio_spread_over_rounds():
    quiet = ratio_spread([0.50, 0.52, 0.48], 0.25)
    assert quiet["median"] == pytest.approx(0.50) and quiet["min"] == 0.48 and quiet["max"] == 0.52
    assert quiet["spread"] == pytest.approx(0.08) and quiet["trusted"] is True
    loaded = ratio_spread([0.06, 0.51, 0.50], 0.25)  # load landed on the teacher in round 0
    assert loaded["median"] == pytest.approx(0.50)  # the median resists the one loaded round
    assert loaded["spread"] == pytest.approx((0.51 - 0.06) / 0.50) and loaded["trusted"] is False
    one = ratio_spread([0.5, None], 0.25)
    assert one["median"] == 0.5 and one["spread"] is None and one["trusted"] is None
    assert one["per_round"] == [0.5, None]
    assert ratio_spread([None, None], 0.25)["median"] is None


def test_timing_ratios_per_round_from_figures():
    def fig(lat, tps):
        return {"latency_ms_p50": lat, "output_tokens_per_s": tps, "answers": 3}

    per_round = [{"teacher": fig(1000, 10), "baseline_student": fig(600, 16), "student": fig(500, 20)},
                 {"teacher": fig(2000, 5), "baseline_student": fig(1200, 8), "student": fig(1000, 10)},
                 {"teacher": fig(1000, 10), "baseline_student": fig(None, None), "student": fig(900, 12)}]
    r = timing_ratios(per_round, "student", 0.25)
    assert r["latency_ms_p50"]["per_round"] == [0.5, 0.5, 0.9]
    assert r["latency_ms_p50"]["median"] == 0.5 and r["latency_ms_p50"]["spread"] == pytest.approx(0.8)
    assert r["latency_ms_p50"]["trusted"] is False
    assert r["output_tokens_per_s"]["per_round"] == [2.0, 2.0, 1.2]
    b = timing_ratios(per_round, "baseline_student", 0.25)
    assert b["latency_ms_p50"]["per_round"] == [0.6, 0.6, None] and b["latency_ms_p50"]["trusted"] is True


def test_report_rounds_and_untrusted_ratio_warning(tmp_path):
    rows = _rows(4)
    rounds = [0, 1, 0, 1]
    # round 0: student at half the teacher's latency; round 1: the machine was loaded while the student ran
    lat_t, lat_s = [1.0, 1.0, 1.0, 1.0], [0.5, 2.0, 0.5, 2.0]
    teacher = [dict(r, latency_s=x, batch_id=f"t{i}") for i, (r, x) in enumerate(zip(rows, lat_t))]
    student = [dict(r, latency_s=x, batch_id=f"s{i}") for i, (r, x) in enumerate(zip(rows, lat_s))]
    answers = {"teacher": _table(teacher, rounds), "baseline_student": _table(teacher, rounds),
               "student": _table(student, rounds)}
    report = _report(answers)
    assert report["timing"]["rounds"] == 2
    assert [r["prompts"] for r in report["timing"]["per_round"]] == [2, 2]
    lat = report["compared_to_teacher"]["student"]["latency_ms_p50"]
    assert lat["per_round"] == [0.5, 2.0] and lat["median"] == pytest.approx(1.25) and lat["trusted"] is False
    assert report["compared_to_teacher"]["baseline_student"]["latency_ms_p50"]["trusted"] is True
    assert any(w.startswith("student/teacher latency p50 ratio varies by 120% over 2 rounds (min 0.50, max 2.00)")
               for w in report["warnings"]), report["warnings"]
    write_report(tmp_path, report, answers)
    md = (tmp_path / "report.md").read_text()
    assert "| 0 | 2 | 1,000.0 | 1,000.0 | 500.0 | 0.50 | 2.00 |" in md
    assert ("Latency p50 (median over rounds): 1.25× the teacher's (rounds 0.50–2.00, spread 120%) "
            "**not to be trusted: machine load**") in md


def test_split_rounds_interleaves_every_prompt_once():
    prompts = pa.table({"prompt_id": [f"p{i}" for i in range(7)], "task": ["math"] * 4 + ["nli"] * 3})
    parts = split_rounds(prompts, 3)
    assert [p.column("prompt_id").to_pylist() for p in parts] == [["p0", "p3", "p6"], ["p1", "p4"], ["p2", "p5"]]
    assert {"math", "nli"} <= set(parts[0].column("task").to_pylist())  # each part mixes the tasks
    assert len(split_rounds(prompts, 20)) == 7  # never an empty round


def test_report_without_references_scores_agreement_only(tmp_path):
    rows = [{"prompt_id": p, "task": "conversation", "reference": None, "response": r, "response_tokens": 3,
             "latency_s": lat, "batch_id": "b"} for p, r, lat in (("a", "hello there friend", 1.0),
                                                                   ("b", "good day", 2.0))]
    answers = {"teacher": _table(rows), "baseline_student": _table([dict(r, response="zz") for r in rows]),
               "student": _table([dict(r, response="hello friend") for r in rows])}
    report = _report(answers)
    models = report["models"]
    assert models["teacher"]["metrics"] == {} and models["teacher"]["quality"] is None
    assert models["student"]["agreement_rougeL"] > models["baseline_student"]["agreement_rougeL"] == 0.0
    assert report["retained"] == {"quality": None}
    write_report(tmp_path, report, answers)
    text = (tmp_path / "report.md").read_text()
    assert "| agreement with teacher (ROUGE-L, 0–1) | 1.000 | 0.000 |" in text and "n/a" in text
    assert all((tmp_path / p).read_bytes()[:4] == b"\x89PNG" for p in ("quality_vs_latency.png", "agreement.png"))


def test_unscorable_references_are_counted_per_task(tmp_path):
    """One NLI reference no scorer reads must not leave accuracy 1.0 unexplained; label_map maps integers."""
    refs = ["entailment", "2", "maybe so"]  # "2" is contradiction through data.label_map; "maybe so" is unscorable
    rows = [dict(r, task="nli", reference=ref, response=ans)
            for r, ref, ans in zip(_rows(3), refs, ["entailment", "contradiction", "neutral"])]
    answers = {n: _table(rows) for n in MODEL_NAMES}
    report = _report(answers, label_map={"0": "entailment", "1": "neutral", "2": "contradiction"})
    t = report["models"]["teacher"]
    assert t["unscorable"] == {"nli": 1} and t["metrics"]["nli"]["accuracy"] == 1.0  # 2 of 2 scorable
    assert any(w.startswith("nli: 1 reference(s) could not be scored") for w in report["warnings"])
    write_report(tmp_path, report, answers)
    assert "| nli | accuracy | 1.000 | 1.000 | 1.000 | 1.000 | 1 |" in (tmp_path / "report.md").read_text()


def test_a_student_that_answered_other_prompts_is_flagged():
    """eval.max_model_len too small for the students only: 2 of 4 prompts fail for them, so their
    ratios compare other prompts than the teacher's; the report says so."""
    ok = _rows(4)
    part = [dict(r, response="", response_tokens=0, latency_s=None, batch_id="", finish_reason="error",
                 error="prompt too long") if i % 2 else r for i, r in enumerate(ok)]
    answers = {"teacher": _table(ok), "baseline_student": _table(part), "student": _table(part)}
    warnings = _report(answers)["warnings"]
    for name in ("baseline_student", "student"):
        assert (f"{name} and the teacher answered different prompts (2 answered by only one of them): its quality "
                "and timing ratios compare different prompt sets") in warnings
    same = _report({n: _table(ok) for n in MODEL_NAMES})["warnings"]
    assert not any("different prompts" in w for w in same)


def test_finite_makes_reports_strict_json():
    """runtime.finite, used by evaluate's and bench-serve's reports: NaN and ±inf become null at any
    depth, tuples become lists, everything else is kept."""
    from raydistill.runtime import finite

    report = {"a": math.nan, "b": [1.5, math.inf, {"c": -math.inf, "d": (2, math.nan)}], "e": "x", "f": None, "g": 3}
    out = finite(report)
    assert out == {"a": None, "b": [1.5, None, {"c": None, "d": [2, None]}], "e": "x", "f": None, "g": 3}
    assert json.loads(json.dumps(out, allow_nan=False)) == out


def test_timed_engines_run_every_model_at_the_same_load():
    """Teacher batch 128 × 2 replicas on TP8 vs students batch 64 × 1 on one GPU made the ratios compare
    different loads; the timed rounds give every model eval's batch size, replicas and concurrency."""
    from raydistill.config import Config
    from raydistill.evaluate.rounds import timed_engines, timing_settings

    cfg = Config.model_validate({
        "teacher": {"model": "t", "engine": "vllm", "batch_size": 128, "replicas": 2, "tensor_parallel_size": 8,
                    "max_concurrent_batches": 4},
        "eval": {"engine": "vllm", "batch_size": 64, "replicas": 1, "gpus_per_replica": 1}})
    engines = timed_engines(cfg)
    assert engines["teacher"].tensor_parallel_size == 8  # what the model needs stays
    settings = timing_settings(engines)
    for name in MODEL_NAMES:
        assert {k: settings[name][k] for k in ("engine", "batch_size", "replicas", "concurrency")} == \
            {"engine": "vllm", "batch_size": 64, "replicas": 1, "concurrency": 1}, name
    assert (settings["teacher"]["gpus"], settings["student"]["gpus"]) == (8, 1)


def test_report_gives_throughput_per_gpu_and_states_the_settings(tmp_path):
    rows = _rows(2)
    teacher = [dict(r, latency_s=1.0, response_tokens=40, batch_id=f"t{i}") for i, r in enumerate(rows)]
    student = [dict(r, latency_s=1.0, response_tokens=20, batch_id=f"s{i}") for i, r in enumerate(rows)]
    answers = {"teacher": _table(teacher, [0, 1]), "baseline_student": _table(student, [0, 1]),
               "student": _table(student, [0, 1])}
    load = {"engine": "vllm", "batch_size": 64, "replicas": 1, "concurrency": 1}
    settings = {"teacher": dict(load, gpus=8), "baseline_student": dict(load, gpus=1), "student": dict(load, gpus=1)}
    report = _report(answers, settings=settings)
    m = report["models"]
    assert m["teacher"]["output_tokens_per_s"] == pytest.approx(40.0)
    assert m["teacher"]["output_tokens_per_s_per_gpu"] == pytest.approx(5.0)
    assert m["student"]["output_tokens_per_s_per_gpu"] == pytest.approx(20.0)
    cmp = report["compared_to_teacher"]["student"]
    assert cmp["output_tokens_per_s"]["median"] == pytest.approx(0.5)
    assert cmp["output_tokens_per_s_per_gpu"]["median"] == pytest.approx(4.0)  # 20 / 5 tokens/s per GPU
    assert report["timing"]["settings"] == settings
    write_report(tmp_path, report, answers)
    md = (tmp_path / "report.md").read_text()
    said = "(every model at batch 64, 1 replica(s), 1 batch(es) in flight; GPUs: teacher 8, student 1)"
    assert f"Output tokens/s (median over rounds): 0.50× the teacher's (rounds 0.50–0.50, spread 0%) {said}" in md
    assert "per GPU: 4.00× the teacher's" in md and "Latency p50 (median over rounds): 1.00× the teacher's" in md
    # without settings (e.g. an older caller) nothing is claimed
    plain = _report(answers)
    assert plain["models"]["teacher"]["output_tokens_per_s_per_gpu"] is None
    assert plain["compared_to_teacher"]["student"]["output_tokens_per_s_per_gpu"]["median"] is None


def test_split_rounds_of_whole_batches():
    prompts = pa.table({"prompt_id": [f"p{i}" for i in range(23)], "task": ["math"] * 12 + ["nli"] * 11})
    parts = split_rounds(prompts, 3, batch_size=4)  # 6 batches (the last of 3 rows): 2 per round
    assert [p.num_rows for p in parts] == [8, 8, 7]
    ids = [i for p in parts for i in p.column("prompt_id").to_pylist()]
    assert sorted(ids) == sorted(prompts.column("prompt_id").to_pylist())  # every prompt once
    assert all({"math", "nli"} <= set(p.column("task").to_pylist()) for p in parts)
    assert [p.num_rows for p in split_rounds(prompts, 10, batch_size=8)] == [8, 8, 7]  # never an empty round
    assert [p.num_rows for p in split_rounds(prompts, 2, batch_size=4)] == [12, 11]  # 3 + 3 batches


class _CountingEngine:
    """A test-only engine behind ``answer_dataset``: counts engine constructions, answers each block
    as one batch (batch id, the rows it held)."""

    def __init__(self):
        self.constructions = 0
        self.batches = []

    def answer_dataset(self, blocks, model, engine, gen, storage=None):
        self.constructions += 1
        outer = self

        class Answers:
            def iter_batches(self, **_):
                for k, block in enumerate(blocks):
                    assert block.num_rows <= engine.batch_size
                    outer.batches.append(block.column("prompt_id").to_pylist())
                    rows = [dict(r, response="ok", response_tokens=1, latency_s=0.1, batch_id=f"{model}-{k}")
                            for r in block.to_pylist()]
                    yield _table(rows)

        return Answers()


@pytest.mark.parametrize("rounds", [1, 3, 5])
def test_one_engine_per_model_whatever_eval_rounds(monkeypatch, rounds):
    """Evaluate started every engine again in every round (eval.rounds × 3 engine loads)."""
    import ray.data

    import raydistill.generate.answer as answer
    from raydistill.config import EvalConfig
    from raydistill.evaluate.rounds import answer_rounds

    fake = _CountingEngine()
    monkeypatch.setattr(answer, "answer_dataset", fake.answer_dataset)
    monkeypatch.setattr(ray.data, "from_arrow", lambda blocks: blocks)  # the blocks as the engine gets them
    engine = EvalConfig(engine="hf", batch_size=4)
    prompts = _table([{"prompt_id": f"p{i}", "task": "qa", "reference": None, "response": "", "response_tokens": 0,
                       "latency_s": None, "batch_id": ""} for i in range(22)])
    parts = split_rounds(prompts, rounds, engine.batch_size)
    answers = {name: answer_rounds(parts, name, engine, None) for name in MODEL_NAMES}
    assert fake.constructions == len(MODEL_NAMES)  # one per model, not rounds × models
    round_of = {pid: r for r, p in enumerate(parts) for pid in p.column("prompt_id").to_pylist()}
    assert all(len({round_of[pid] for pid in batch}) == 1 for batch in fake.batches)  # no batch mixes rounds
    for table in answers.values():
        assert dict(zip(table.column("prompt_id").to_pylist(), table.column("round").to_pylist())) == round_of
    assert len(set(round_of.values())) == min(rounds, 6)


def _documented(doc: str) -> dict[str, tuple[set[str], str]]:
    """docs/report.md's sections (### / #### headings) → (the keys in the first column of its table, its text)."""
    import re

    sections: dict[str, tuple[set[str], str]] = {}
    for block in re.split(r"^#{3,4} ", doc, flags=re.M)[1:]:
        title, _, body = block.partition("\n")
        keys = set(re.findall(r"^\| `([^`]+)` \|", body, flags=re.M))
        sections[title.strip().strip("`")] = (keys, body)
    return sections


def test_every_report_key_is_documented_in_docs_report_md(tmp_path):
    """docs/report.md documents report.json: every key of the report (top level, each model, each
    nested object with fixed keys) has a row there, and the doc has no row for a key the report lacks."""
    from pathlib import Path

    from raydistill.config import Config
    from raydistill.evaluate.report import run_keys
    from raydistill.evaluate.rounds import timed_engines, timing_settings
    from raydistill.schema import SCHEMA_VERSION

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "manifest.json").write_text(json.dumps(
        {"schema_version": SCHEMA_VERSION, "rows": 4, "rejects": {"empty": 1}}))
    cfg = Config.model_validate({"teacher": {"model": "t"}, "output_dir": str(tmp_path)})
    rows = _rows(2)
    answers = {n: _table(rows, [0, 1]) for n in MODEL_NAMES}
    extra = run_keys(cfg, {})
    report = json.loads(json.dumps(_report(answers, extra=extra, settings=timing_settings(timed_engines(cfg)))))
    served = json.loads(json.dumps(run_keys(cfg, {}, {"teacher": None, "student": None}, "http://e/v1")))
    doc = _documented((Path(__file__).parents[1] / "docs" / "report.md").read_text())

    def same(section: str, obj: dict) -> None:
        assert set(obj) == doc[section][0], (section, set(obj) ^ doc[section][0])

    same("Top level", report)
    for name in MODEL_NAMES:
        same("models.<name>", report["models"][name])
        same("timing.settings.<name>", report["timing"]["settings"][name])
        assert set(report["memory_probe"]["models"][name]) == {"dtype", "device"}
    for name in ("baseline_student", "student"):
        same("compared_to_teacher.<student>", report["compared_to_teacher"][name])
        for value in report["compared_to_teacher"][name].values():
            if isinstance(value, dict):
                same("Ratio summary", value)
    for section in ("timing_source", "memory_probe", "thresholds", "timing", "corpus_rejects"):
        same(section, report[section])
    same("timing_source", served["timing_source"])
    same("timing.per_round[]", report["timing"]["per_round"][0])
    for figures in report["timing"]["per_round"][0]["models"].values():
        assert all(f"`{k}`" in doc["timing.per_round[]"][1] for k in figures), figures
