"""The evaluate stage on a run folder: prompts from the corpus's split, eval.limit, and a real
hf-engine evaluation of tiny models in interleaved timing rounds."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydistill.config import load
from raydistill.corpus import write_prompts
from raydistill.data import load_prompts, select_split
from raydistill.schema import PROMPTS_SCHEMA, SchemaError

from .conftest import build_tiny_model, mixed_prompts
from .helpers import eval_config, finished_answers, write_corpus


def test_changed_data_seed_still_evaluates_the_corpus_test_split(tmp_path, tiny_model, caplog):
    """data.seed=1 at evaluate re-splits the same file differently: the corpus's split must win."""
    from raydistill.evaluate.prompts import load_eval_prompts

    cfg_file, sets = eval_config(tmp_path, tiny_model, mixed_prompts(60))
    made = load(cfg_file, sets)
    corpus_prompts = write_corpus(made)
    corpus_test = set(select_split(corpus_prompts, ("test",)).column("prompt_id").to_pylist())
    corpus_train = set(select_split(corpus_prompts, ("train",)).column("prompt_id").to_pylist())
    later = load(cfg_file, sets + ["data.seed=1"])
    resplit = set(select_split(load_prompts(later.data), ("test",)).column("prompt_id").to_pylist())
    assert resplit & corpus_train  # what re-reading data.path with today's seed would have evaluated
    with caplog.at_level(logging.WARNING, logger="raydistill.evaluate"):
        prompts, changes = load_eval_prompts(later)
    assert set(prompts.column("prompt_id").to_pylist()) == corpus_test
    assert not set(prompts.column("prompt_id").to_pylist()) & corpus_train
    assert changes == {"data.seed": {"corpus": 0, "now": 1}}
    assert "data.seed is 1 now but 0 when the corpus was made" in caplog.text


def test_evaluated_prompt_that_is_a_train_row_of_the_corpus_fails(tmp_path, tiny_model):
    from raydistill.evaluate.prompts import load_eval_prompts

    cfg_file, sets = eval_config(tmp_path, tiny_model, mixed_prompts(30))
    cfg = load(cfg_file, sets)
    prompts = load_prompts(cfg.data)
    write_corpus(cfg, prompts)
    # prompts/ rewritten (e.g. by another tool) so that two train rows of the corpus became test prompts
    rows = prompts.to_pylist()
    moved = [r["prompt_id"] for r in rows if r["split"] == "train"][:2]
    for r in rows:
        if r["prompt_id"] in moved:
            r["split"] = "test"
    write_prompts(Path(cfg.output_dir) / "corpus", pa.Table.from_pylist(rows, schema=PROMPTS_SCHEMA))
    with pytest.raises(SchemaError) as err:
        load_eval_prompts(cfg)
    msg = str(err.value)
    assert "test prompt(s)" in msg and "were trained on" in msg and "2 share a train row's prompt id" in msg
    assert all(pid in msg for pid in moved)


def test_eval_limit_is_a_sample_spread_over_tasks(tmp_path, tiny_model):
    """eval.limit=10 over a test split of 14 math then 6 NLI prompts: 7 + 3, not the first 10 rows."""
    from raydistill.evaluate.prompts import load_eval_prompts

    cfg_file, sets = eval_config(tmp_path, tiny_model, mixed_prompts(5), ["eval.limit=10"])
    cfg = load(cfg_file, sets)
    def msgs(pid):  # distinct questions: evaluate refuses a test prompt whose messages are a train row's
        return [{"role": "user", "content": f"q {pid}"}]

    rows = ([{"prompt_id": f"m{i}", "split": "test", "task": "math", "messages": msgs(f"m{i}"), "reference": "1"}
             for i in range(14)]
            + [{"prompt_id": f"n{i}", "split": "test", "task": "nli", "messages": msgs(f"n{i}"), "reference": "neutral"}
               for i in range(6)]
            + [{"prompt_id": f"t{i}", "split": "train", "task": "math", "messages": msgs(f"t{i}"), "reference": "1"}
               for i in range(5)])
    write_corpus(cfg, pa.Table.from_pylist(rows, schema=PROMPTS_SCHEMA))
    prompts, _ = load_eval_prompts(cfg)
    tasks = prompts.column("task").to_pylist()
    assert (tasks.count("math"), tasks.count("nli")) == (7, 3)
    again, _ = load_eval_prompts(cfg)
    assert again.column("prompt_id").to_pylist() == prompts.column("prompt_id").to_pylist()  # seeded


def _strict_json(path: Path) -> dict:
    def refuse(const):
        raise AssertionError(f"{path} holds {const}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_evaluate_hf_engine_in_interleaved_rounds(tmp_path, tiny_model, ray_local):
    from raydistill.evaluate import run_evaluate
    from raydistill.evaluate.figures import MODEL_NAMES

    cfg_file, sets = eval_config(tmp_path, tiny_model, mixed_prompts(30),
                             ["data.split.test=0.5", "eval.limit=8", "eval.rounds=2", "eval.min_retained=1000"])
    made = load(cfg_file, sets)
    corpus_prompts = write_corpus(made)
    out = Path(made.output_dir)
    build_tiny_model(out / "baseline_student", num_layers=2, seed=1)
    build_tiny_model(out / "student", num_layers=2, seed=2)
    cfg = load(cfg_file, sets + ["data.seed=3"])  # changed after generate: the corpus's split still rules
    report = run_evaluate(cfg)

    assert not (out / "eval.partial").exists()
    assert _strict_json(out / "eval" / "report.json") == json.loads(json.dumps(report))
    corpus_test = set(select_split(corpus_prompts, ("test",)).column("prompt_id").to_pylist())
    answers = pq.read_table(out / "eval" / "answers.parquet").to_pylist()
    assert len(answers) == 3 * 8
    ids = {n: [a["prompt_id"] for a in answers if a["model"] == n] for n in MODEL_NAMES}
    assert ids["teacher"] == ids["student"] == ids["baseline_student"] and len(set(ids["teacher"])) == 8
    assert set(ids["teacher"]) <= corpus_test
    # two rounds of four prompts, every model answering each round's prompts
    per_round = {(a["model"], a["round"]) for a in answers}
    assert per_round == {(n, r) for n in MODEL_NAMES for r in (0, 1)}
    assert report["timing"]["rounds"] == 2 and [r["prompts"] for r in report["timing"]["per_round"]] == [4, 4]
    settings = report["timing"]["settings"]  # every model timed at eval's batch size and replicas
    assert {(s["batch_size"], s["replicas"], s["concurrency"], s["gpus"]) for s in settings.values()} == {(4, 1, 1, 0)}
    assert report["data_changed_since_corpus"] == {"data.seed": {"corpus": 0, "now": 3}}
    assert any(w.startswith("data.seed differs from the corpus's settings") for w in report["warnings"])
    assert report["prompts"] == 8 and sum(report["prompts_by_task"].values()) == 8
    # the quality gate: no student retains 1000 times the teacher (or quality is unmeasured): it fails,
    # in the report and as exit code 3 of the CLI, which reads the finished evaluation again
    from typer.testing import CliRunner

    from raydistill.cli import GATE_FAILED, app
    from raydistill.evaluate.report import quality_gate

    assert report["gate"] == quality_gate(report["retained"], 1000.0) and report["gate"]["passed"] is False
    assert "Quality gate (`eval.min_retained` = 1000.0): **failed**" in (out / "eval" / "report.md").read_text()
    r = CliRunner().invoke(app, ["evaluate", str(cfg_file), *[x for s in sets + ["data.seed=3"] for x in ("--set", s)]])
    assert r.exit_code == GATE_FAILED == 3, r.output
    assert "quality gate failed: the student retains less than eval.min_retained=1000.0" in r.output

    for key in ("latency_ms_p50", "output_tokens_per_s"):
        r = report["compared_to_teacher"]["student"][key]
        assert len(r["per_round"]) == 2 and all(v is not None and v > 0 for v in r["per_round"])
        assert r["min"] <= r["median"] <= r["max"]
        assert r["spread"] == pytest.approx((r["max"] - r["min"]) / r["median"])
        assert r["trusted"] is (r["spread"] <= cfg.eval.max_ratio_spread)
    for name in MODEL_NAMES:
        m = report["models"][name]
        assert m["answers"] == 8 and m["errors"] == 0
        assert m["finish_stop_share"] + m["finish_length_share"] == pytest.approx(1.0)
        assert 1 <= m["mean_output_tokens"] <= 12
        assert m["latency_ms_p50"] <= m["latency_ms_p95"] and m["latency_ms_per_token_p50"] > 0
        assert m["output_tokens_per_s"] > 0
        assert m["dtype"] == "float32"
        assert report["memory_probe"]["models"][name] == {"dtype": "float32", "device": "cpu"}
        assert m["process_baseline_mb"] > 100 and m["model_memory_mb"] >= 0
        assert m["peak_memory_mb"] == pytest.approx(m["process_baseline_mb"] + m["model_memory_mb"], abs=0.2)
        assert m["size_mb"] > 0 and m["size_dtype"] == "float32"
        assert m["size_mb_eval_dtype"] == pytest.approx(m["params"] * 4 / 1e6, abs=0.01)
        assert isinstance(m["degenerate"], bool) and isinstance(m["unscorable"], dict)
        assert all(math.isfinite(v) for ms in m["metrics"].values() for v in ms.values())
    assert report["compared_to_teacher"]["student"]["params"] < 1
    md = (out / "eval" / "report.md").read_text()
    assert "## Timing rounds" in md and "| 0 | 4 |" in md and "| 1 | 4 |" in md
    assert "| ended by themselves (finish stop) |" in md and "median over rounds" in md
    for png in ("quality_vs_latency.png", "agreement.png"):
        assert (out / "eval" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_finished_answers_survive_a_model_without_answers_and_failed_probes(tmp_path, tiny_model, monkeypatch):
    """eval.max_model_len=24: a model answers nothing; hub-like paths the probe cannot load; a plot
    that fails. The report is still written, with nulls and warnings, and eval.partial/ is gone."""
    from raydistill.evaluate import render
    from raydistill.evaluate.figures import MODEL_NAMES
    from raydistill.evaluate.run import finish_evaluation

    cfg_file, sets = eval_config(tmp_path, tiny_model, mixed_prompts(5))
    cfg = load(cfg_file, sets)
    prompts, answers = finished_answers(cfg)
    paths = {n: f"no-org/{n}-not-cached" for n in MODEL_NAMES}  # not local, not in the HF cache
    engines = {"teacher": cfg.teacher, "baseline_student": cfg.eval, "student": cfg.eval}

    def broken_plots(report, folder):
        raise RuntimeError("matplotlib backend exploded")

    monkeypatch.setattr(render, "write_plots", broken_plots)
    report = finish_evaluation(cfg, prompts, answers, paths, engines, {})
    out = Path(cfg.output_dir)
    assert not (out / "eval.partial").exists()
    assert _strict_json(out / "eval" / "report.json") == json.loads(json.dumps(report))
    b = report["models"]["baseline_student"]
    assert b["answers"] == 0 and b["latency_ms_p50"] is None and b["quality"] is None
    # "It is N." states no final answer: strict accuracy 0, lenient 1
    assert report["models"]["student"]["metrics"] == {"math": {"accuracy": 0.0, "accuracy_lenient": 1.0}}
    for name in MODEL_NAMES:
        m = report["models"][name]
        assert m["size_mb"] is None and m["params"] is None and m["model_memory_mb"] is None
    w = report["warnings"]
    assert any(x.startswith("baseline_student answered none of the 4 prompts") for x in w), w
    assert sum(x.startswith(f"{n}: memory and parameter figures are null: memory probe failed for no-org/{n}")
               for n in MODEL_NAMES for x in w) == 3, w
    assert "plots could not be drawn: RuntimeError: matplotlib backend exploded" in w
    assert len(pq.read_table(out / "eval" / "answers.parquet")) == 12
    md = (out / "eval" / "report.md").read_text()
    assert "| latency p50 per answer (ms) | 650.0 | n/a | 650.0 |" in md
    assert "| parameters | n/a | n/a | n/a |" in md


def test_a_failure_after_the_answers_keeps_them(tmp_path, tiny_model, monkeypatch, caplog):
    from raydistill.evaluate import render
    from raydistill.evaluate.figures import MODEL_NAMES
    from raydistill.evaluate.run import finish_evaluation

    cfg_file, sets = eval_config(tmp_path, tiny_model, mixed_prompts(5), ["eval.memory_probe=false"])
    cfg = load(cfg_file, sets)
    prompts, answers = finished_answers(cfg)
    paths = {n: f"no-org/{n}-not-cached" for n in MODEL_NAMES}
    engines = {"teacher": cfg.teacher, "baseline_student": cfg.eval, "student": cfg.eval}

    def broken_markdown(report, answers, path):
        raise OSError("disk full")

    monkeypatch.setattr(render, "write_markdown", broken_markdown)
    with pytest.raises(OSError, match="disk full"), caplog.at_level(logging.ERROR, logger="raydistill.evaluate"):
        finish_evaluation(cfg, prompts, answers, paths, engines, {})
    kept = Path(cfg.output_dir) / "eval.partial" / "answers.parquet"
    table = pq.read_table(kept)
    assert table.num_rows == 12 and set(table.column("model").to_pylist()) == set(MODEL_NAMES)
    assert not (Path(cfg.output_dir) / "eval").exists()
    assert f"the answers are kept in {kept}" in caplog.text
