"""The pipeline as a job runs it: every input and output in S3 (moto's server mode on 127.0.0.1).

``raydistill run`` (generate → train → evaluate) reads its prompts from ``s3://…/prompts/`` and
writes the corpus, the checkpoints, the student and ``eval/`` under an ``s3://`` output_dir; nothing
lands in a local run folder. Evaluate's S3 contract (``raydistill.evaluate``): the answers reach
``eval.partial/`` in S3 first and stay there after a failure; ``eval/`` is replaced only by a
complete folder, ``report.json`` last."""

from __future__ import annotations

import json
import logging
import math
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from raydistill.cli import app
from raydistill.config import load
from raydistill.storage import local_copy, storage_path

from .conftest import make_bucket
from .helpers import eval_config, finished_answers, s3_files, user_config

EVAL_FILES = {"answers.parquet", "report.json", "report.md", "quality_vs_latency.png", "agreement.png", "config.yaml"}


def _bucket() -> str:
    return make_bucket(f"raydistill-{uuid.uuid4().hex[:12]}")  # unique: caches are keyed by the URI


def _upload(local: Path, uri: str) -> None:
    dest = storage_path(uri)
    with dest.fs.open_output_stream(dest.path) as f:
        f.write(local.read_bytes())


def _eval_inputs(tmp_path: Path, tiny_model: Path, run: str):
    from raydistill.evaluate.figures import MODEL_NAMES

    cfg_file, sets = eval_config(tmp_path, tiny_model, [{"qid": "q0", "kind": "math", "question": "q", "answer": "1"}])
    cfg = load(cfg_file, sets + [f"output_dir={run}"])
    prompts, answers = finished_answers(cfg)
    paths = {n: f"no-org/{n}-not-cached" for n in MODEL_NAMES}  # no probe: this is about the folders
    engines = {"teacher": cfg.teacher, "baseline_student": cfg.eval, "student": cfg.eval}
    return cfg, prompts, answers, paths, engines


def test_evaluate_on_s3_keeps_the_answers_and_replaces_eval_only_when_complete(tmp_path, tiny_model, s3_server,
                                                                               monkeypatch, caplog):
    """output_dir on S3: a failure after the answers leaves them in ``eval.partial/`` in S3 and the
    previous ``eval/`` untouched; an upload cut short leaves an ``eval/`` without ``report.json``
    (unfinished); a finished evaluation replaces ``eval/`` whole and removes ``eval.partial/``."""
    import raydistill.storage as st
    from raydistill.evaluate import render
    from raydistill.evaluate.figures import MODEL_NAMES
    from raydistill.evaluate.run import finish_evaluation

    run = f"{_bucket()}/run"
    cfg, prompts, answers, paths, engines = _eval_inputs(tmp_path, tiny_model, run)
    storage_path(f"{run}/eval/stale.txt").write_text("from an older evaluation")
    storage_path(f"{run}/eval/report.json").write_text("{}")

    def broken_markdown(report, answers, path):
        raise OSError("disk full")

    with monkeypatch.context() as m, caplog.at_level(logging.ERROR, logger="raydistill.evaluate"):
        m.setattr(render, "write_markdown", broken_markdown)
        with pytest.raises(OSError, match="disk full"):
            finish_evaluation(cfg, prompts, answers, paths, engines, {})
    kept = storage_path(f"{run}/eval.partial/answers.parquet")
    table = pq.read_table(kept.path, filesystem=kept.fs)
    assert table.num_rows == 12 and set(table.column("model").to_pylist()) == set(MODEL_NAMES)
    assert f"the answers are kept in {kept.uri}" in caplog.text
    assert s3_files(f"{run}/eval") == {"stale.txt", "report.json"}  # the old eval/ as it was

    real_upload = st.upload_dir

    def cut_short(local, dest):  # every file but the last one made it
        real_upload(local, dest)
        if dest.name == "eval":
            raise OSError("connection reset")

    with monkeypatch.context() as m:
        m.setattr(st, "upload_dir", cut_short)
        with pytest.raises(OSError, match="connection reset"):
            finish_evaluation(cfg, prompts, answers, paths, engines, {})
    assert s3_files(f"{run}/eval") == EVAL_FILES - {"report.json"}  # unfinished: no report.json
    assert s3_files(f"{run}/eval.partial") == EVAL_FILES  # the complete new evaluation, uploaded first

    report = finish_evaluation(cfg, prompts, answers, paths, engines, {}, shown={"student": f"{run}/student"})
    assert s3_files(f"{run}/eval") == EVAL_FILES
    assert not storage_path(f"{run}/eval.partial").exists()
    assert json.loads(storage_path(f"{run}/eval/report.json").read_text()) == json.loads(json.dumps(report))
    assert report["models"]["student"]["path"] == f"{run}/student"
    assert report["prompt_source"] == f"{run}/corpus/prompts"
    assert yaml.safe_load(storage_path(f"{run}/eval/config.yaml").read_text())["output_dir"] == run
    assert not (tmp_path / "run").exists() and not Path("s3:").exists()  # nothing written locally


def test_engines_read_an_s3_model_on_their_own_nodes(tmp_path, tiny_model, s3_server, ray_local):
    """An ``s3://`` model (a student train wrote) goes to the engines as its URI, and each replica
    fetches it where it runs: the hf actors through ``storage.local_copy``, vLLM through Ray LLM's
    own downloader. The answers equal those from the local folder: no engine depends on a copy on
    the driver's disk, which a replica on another node would not have."""
    import pyarrow as pa

    from raydistill.config import EngineConfig, GenerationConfig, StorageConfig
    from raydistill.generate import generate_table
    from raydistill.schema import PROMPTS_SCHEMA
    from raydistill.storage import upload_dir

    uri = f"{_bucket()}/student"
    upload_dir(tiny_model, storage_path(uri))
    prompts = pa.Table.from_pylist([{"prompt_id": f"p{i}", "split": "test", "task": "conversation",
                                     "messages": [{"role": "user", "content": f"Hello {i}"}], "reference": None}
                                    for i in range(4)], schema=PROMPTS_SCHEMA)
    gen = GenerationConfig(max_new_tokens=6)
    hf = EngineConfig(engine="hf", batch_size=4, max_model_len=256)
    here = generate_table(prompts, str(tiny_model), hf, gen)
    fetched = generate_table(prompts, uri, hf, gen, StorageConfig())
    assert fetched.column("response_token_ids").to_pylist() == here.column("response_token_ids").to_pylist()
    vllm = EngineConfig(engine="vllm", batch_size=4, max_model_len=256, kv_cache_gib=1)
    out = generate_table(prompts, uri, vllm, gen, StorageConfig())
    assert out.column("error").to_pylist() == [None] * 4
    assert all(n > 0 for n in out.column("response_tokens").to_pylist())

    # evaluate's driver copies only the config and tokenizer files; the size comes from the S3
    # listing and the memory probe runs in a Ray task that fetches the model itself
    from raydistill.evaluate.probes import model_info
    from raydistill.models import size_on_disk_mb

    config_only = Path(local_copy(uri, weights=False))
    assert (config_only / "config.json").is_file() and (config_only / "tokenizer_config.json").is_file()
    assert not [f for f in config_only.rglob("*") if f.suffix in (".safetensors", ".bin")]
    info = model_info(str(config_only), hf, [[{"role": "user", "content": "Hi"}]], 1, uri, StorageConfig())
    assert info["size_mb"] == round(size_on_disk_mb(tiny_model), 2) > 0
    local = model_info(str(tiny_model), hf, [[{"role": "user", "content": "Hi"}]], 1)
    assert info["params"] == local["params"] > 0 and info["peak_memory_mb"] > 0, info


@pytest.mark.slow
def test_run_end_to_end_on_s3(tiny_model, tmp_path, s3_server):
    """`raydistill run` with prompts in S3 and an s3:// output_dir: the corpus, checkpoints, student
    and eval/ land in S3, the student loads back from a local copy, and the report has figures for
    the teacher, the baseline and the distilled student."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raydistill.corpus import read_manifest, read_prompts
    from raydistill.train.checkpoints import checkpoint_dirs, read_meta

    bucket = _bucket()
    run = f"{bucket}/run"
    cfg_file, sets = user_config(tmp_path, tiny_model, 20, "hf")
    data = Path(next(s for s in sets if s.startswith("data.path=")).split("=", 1)[1])
    _upload(data, f"{bucket}/prompts/part-00000.jsonl")
    sets = [s for s in sets if not s.startswith("data.path=")] + [
        f"data.path={bucket}/prompts/", f"output_dir={run}", "train.workers=1", "train.epochs=1",
        "train.delete_checkpoints=false", "train.max_failures=0", "eval.rounds=1"]
    r = CliRunner().invoke(app, ["run", str(cfg_file), *[x for s in sets for x in ("--set", s)]])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert f"report: {run}/eval/report.md" in r.output

    manifest = read_manifest(f"{run}/corpus")
    prompts = read_prompts(f"{run}/corpus")
    kept_or_rejected = manifest["rows"] + sum(manifest["rejects"].values())
    assert kept_or_rejected == manifest["rows_generated"] == \
        sum(s in ("train", "validation") for s in prompts.column("split").to_pylist())
    assert manifest["rows"] > 0 and manifest["data"]["path"] == f"{bucket}/prompts/"

    summary = json.loads(storage_path(f"{run}/train/summary.json").read_text())
    assert summary["steps"] >= 1 and summary["student"] == f"{run}/student"
    assert summary["baseline_student"] == f"{run}/baseline_student"
    checkpoints = checkpoint_dirs(f"{run}/train/ray")  # where the student was exported from
    assert checkpoints and max(read_meta(c)["step"] for c in checkpoints) == summary["steps"]

    folder = local_copy(f"{run}/student")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.num_hidden_layers == 2  # the pruned student (keep_layers [0, 3])
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] > ids["input_ids"].shape[1]

    assert EVAL_FILES <= s3_files(f"{run}/eval") and not storage_path(f"{run}/eval.partial").exists()
    report = json.loads(storage_path(f"{run}/eval/report.json").read_text())
    test_ids = {p for p, s in zip(prompts.column("prompt_id").to_pylist(), prompts.column("split").to_pylist())
                if s == "test"}
    assert report["prompts"] == len(test_ids) > 0 and report["prompt_source"] == f"{run}/corpus/prompts"
    models = report["models"]
    assert set(models) == {"teacher", "baseline_student", "student"}
    for name, m in models.items():
        assert m["answers"] == len(test_ids), name
        for key in ("agreement_rougeL", "latency_ms_p50", "output_tokens_per_s", "params", "peak_memory_mb"):
            assert isinstance(m[key], (int, float)) and math.isfinite(m[key]), (name, key, m[key])
    assert models["student"]["path"] == f"{run}/student"
    assert models["baseline_student"]["path"] == f"{run}/baseline_student"
    assert models["student"]["params"] < models["teacher"]["params"]
    answers = storage_path(f"{run}/eval/answers.parquet")
    assert set(pq.read_table(answers.path, filesystem=answers.fs).column("prompt_id").to_pylist()) == test_ids
    assert {"config.yaml", "corpus/manifest.json", "student/config.json", "train/summary.json"} <= s3_files(run)
    assert not (tmp_path / "run").exists()  # nothing went to a local run folder

