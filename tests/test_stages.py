"""Stage completion records (raydistill.stages): a finished stage is skipped, a changed setting is
refused naming it, changed inputs or outputs make it again, --overwrite redoes it. Unit tests: no
Ray, no models (the e2e check is tests/test_pipeline.py::test_train_resumes_an_interrupted_run_and_
restarts_a_finished_one)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from raydistill.config import load
from raydistill.stages import Stage, StageSettingsChanged, differences, evaluate_stage, fingerprint
from raydistill.storage import storage_path


def test_differences_name_every_nested_key():
    before = {"train": {"lr": 0.001, "kd": {"alpha": 0.5, "beta": 0.5}, "gone": 1}, "teacher": "a"}
    now = {"train": {"lr": 0.002, "kd": {"alpha": 0.5, "beta": 0.7}, "new": [1, 2]}, "teacher": "a"}
    assert differences(before, now) == ["train.gone: 1 -> None", "train.kd.beta: 0.5 -> 0.7",
                                        "train.lr: 0.001 -> 0.002", "train.new: None -> [1, 2]"]
    assert differences(now, json.loads(json.dumps(now))) == []


def test_fingerprint_lists_names_sizes_and_mtimes_without_markers(tmp_path):
    (tmp_path / "m" / "sub").mkdir(parents=True)
    (tmp_path / "m" / "a.bin").write_bytes(b"123")
    (tmp_path / "m" / "sub" / "b.json").write_text("{}")
    (tmp_path / "m" / "_stage.json").write_text("{}")
    got = fingerprint(storage_path(tmp_path / "m"))
    assert set(got) == {"a.bin", "sub/b.json"} and got["a.bin"][0] == 3
    assert got["a.bin"][1] == (tmp_path / "m" / "a.bin").stat().st_mtime_ns
    assert fingerprint(storage_path(tmp_path / "m" / "a.bin")) == got["a.bin"]
    assert fingerprint(storage_path(tmp_path / "absent")) is None


def _stage(tmp_path: Path, lr: float = 0.001, corpus: str = "c1") -> Stage:
    out = storage_path(tmp_path)
    return Stage("train", out / "train" / "_stage.json", {"student": out / "student"},
                 settings={"train": {"lr": lr}}, inputs={"corpus": corpus})


def _write_student(tmp_path: Path) -> None:
    (tmp_path / "student").mkdir(exist_ok=True)
    (tmp_path / "student" / "model.safetensors").write_bytes(b"weights")


def test_a_finished_stage_is_skipped_refused_or_redone(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="raydistill.stages")
    assert not _stage(tmp_path).done()  # never ran
    _write_student(tmp_path)
    _stage(tmp_path).finish()
    assert _stage(tmp_path).done()
    assert f"train: {tmp_path / 'student'} is complete and was made from the same inputs and settings; skipped" \
        in caplog.text
    # a setting that changes the output: refused, naming the difference and the way out
    with pytest.raises(StageSettingsChanged, match=r"train: .*student is finished but was made with other settings "
                                                   r"\(train.lr: 0.001 -> 0.002\); rerun with --overwrite.*"
                                                   r"`raydistill train --overwrite`"):
        _stage(tmp_path, lr=0.002).done()
    assert isinstance(StageSettingsChanged(""), ValueError)  # the CLI's exit 2 with the message
    assert not _stage(tmp_path, lr=0.002).done(overwrite=True)
    # a new input (e.g. a regenerated corpus): the output is stale, made again without complaint
    caplog.clear()
    assert not _stage(tmp_path, corpus="c2").done()
    assert "train: its inputs changed since" in caplog.text and "corpus: 'c1' -> 'c2'" in caplog.text


def test_a_changed_or_incomplete_output_is_made_again(tmp_path):
    _write_student(tmp_path)
    _stage(tmp_path).finish()
    weights = tmp_path / "student" / "model.safetensors"
    os.utime(weights, ns=(1, 1))  # rewritten since (another mtime)
    assert not _stage(tmp_path).done()
    weights.unlink()
    assert not _stage(tmp_path).done()
    _write_student(tmp_path)
    _stage(tmp_path).finish()
    _stage(tmp_path).forget()  # a rerun started: the record goes before the output is rewritten
    assert not _stage(tmp_path).done()


def _train_inputs(tmp_path: Path, sets: list[str]):
    from raydistill.train.stage import train_stage

    cfg = load(None, [f"output_dir={tmp_path}", *sets])
    manifest = {"rows": 10, "response_tokens": 99, "teacher": "t", "generation_params": {}, "teacher_tokenizer": "x"}
    return cfg, manifest, train_stage(cfg, manifest)


def test_train_stage_settings_and_inputs(tmp_path):
    """What makes another student is a setting (refused when changed: a longer max_steps too);
    where and how often it is checkpointed is not; a regenerated corpus is a new input."""
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "manifest.json").write_text("{}")
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "summary.json").write_text("{}")
    _write_student(tmp_path)
    _, _, stage = _train_inputs(tmp_path, ["train.max_steps=10"])
    stage.finish()
    assert set(json.loads((tmp_path / "train" / "_stage.json").read_text())["outputs"]) == {"student", "summary"}
    assert _train_inputs(tmp_path, ["train.max_steps=10", "train.checkpoint_every_steps=5", "train.keep_checkpoints=3",
                                    "train.delete_checkpoints=false", "train.max_failures=0",
                                    "train.cpus_per_worker=2"])[2].done()
    for sets, diff in ((["train.max_steps=20"], r"train.max_steps: 10 -> 20"),
                       (["train.max_steps=10", "train.epochs=5"], r"train.epochs: 3 -> 5"),
                       (["train.max_steps=10", "train.kd.alpha=0.7"], r"train.kd.alpha: 0.5 -> 0.7"),
                       (["train.max_steps=10", "student.keep_layers=[0,1]"], r"student.keep_layers: None -> \[0, 1\]")):
        with pytest.raises(StageSettingsChanged, match=diff):
            _train_inputs(tmp_path, sets)[2].done()
    # a corpus made again (new manifest file): train runs again, not refused
    os.utime(tmp_path / "corpus" / "manifest.json", ns=(5, 5))
    assert not _train_inputs(tmp_path, ["train.max_steps=10"])[2].done()
    # the summary deleted (what an interrupted rerun looks like): not finished, so not skipped
    stage = _train_inputs(tmp_path, ["train.max_steps=10"])[2]
    stage.finish()
    (tmp_path / "train" / "summary.json").unlink()
    assert not stage.done()


def test_evaluate_stage_skips_the_same_models_and_redoes_a_new_student(tmp_path):
    (tmp_path / "corpus" / "prompts").mkdir(parents=True)
    (tmp_path / "corpus" / "prompts" / "part-0.parquet").write_bytes(b"p")
    for name in ("student", "baseline_student"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"w")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "report.json").write_text("{}")
    cfg = load(None, [f"output_dir={tmp_path}"])
    evaluate_stage(cfg).finish()
    assert evaluate_stage(load(None, [f"output_dir={tmp_path}", "train.lr=0.1"])).done()  # not evaluate's
    with pytest.raises(StageSettingsChanged, match=r"evaluate: .*eval is finished but was made with other settings "
                                                   r"\(eval.rounds: 3 -> 5\)"):
        evaluate_stage(load(None, [f"output_dir={tmp_path}", "eval.rounds=5"])).done()
    os.utime(tmp_path / "student" / "model.safetensors", ns=(7, 7))  # a new student trained since
    assert not evaluate_stage(cfg).done()


def test_train_and_evaluate_take_overwrite():
    from raydistill.cli import app

    for command in ("run", "generate", "train", "evaluate"):
        result = CliRunner().invoke(app, [command, "--help"])
        assert result.exit_code == 0 and "--overwrite" in result.output, command


def test_a_record_on_s3_skips_and_sees_a_rewritten_file(s3_server):
    """The same decisions on an s3:// run folder: one listing gives names, sizes and mtimes."""
    from .conftest import make_bucket

    out = storage_path(f"{make_bucket('stages')}/run")
    (out / "student" / "model.safetensors").write_bytes(b"weights")
    (out / "student" / "config.json").write_text("{}")
    stage = Stage("train", out / "train" / "_stage.json", {"student": out / "student"}, settings={"a": 1})
    stage.finish()
    assert set(fingerprint(out / "student")) == {"config.json", "model.safetensors"}
    assert stage.done()
    (out / "student" / "model.safetensors").write_bytes(b"other weights")  # another size
    assert not stage.done()
