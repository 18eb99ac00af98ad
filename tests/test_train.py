"""The train stage end to end on a tiny model: labels, LoRA, shuffling, resume, checkpoints, config errors, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from raydistill.cli import app
from raydistill.config import load
from raydistill.models import ModelError
from raydistill.train.checkpoints import checkpoint_dirs, checkpoint_step
from raydistill.train.loop import lr_lambda
from raydistill.train.plan import warmup_steps
from raydistill.train.stage import run_train
from raydistill.train.student import BASELINE_RECIPE, ensure_baseline

from .conftest import build_tiny_model
from .helpers import tiny_arch, user_config, write_corpus


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "train" / "metrics.jsonl").read_text().splitlines()]


def _steps_on_disk(out: Path) -> list[int]:
    return sorted(checkpoint_step(d) for d in checkpoint_dirs(out / "train" / "ray"))


def test_baseline_student_is_rebuilt_when_what_made_it_changes(tiny_model, tmp_path, ray_local, monkeypatch):
    """Pruned in a Ray task: the driver (where prune_student is made to fail) reads no weights."""
    from raydistill import models

    def not_here(*args, **kwargs):
        raise AssertionError("the driver pruned the teacher")

    monkeypatch.setattr(models, "prune_student", not_here)
    cfg_file, sets = user_config(tmp_path, tiny_model, 10, "hf")
    out = tmp_path / "run"
    assert load(cfg_file, sets).output_dir == str(out)
    base = ensure_baseline(load(cfg_file, sets))
    assert base == (out / "baseline_student").resolve()
    recipe = json.loads((base / BASELINE_RECIPE).read_text())
    assert recipe["teacher"] == str(tiny_model) and recipe["keep_layers"] == [0, 3] and recipe["kept"] == [0, 3]
    assert recipe["teacher_weights"] == {"model.safetensors": (tiny_model / "model.safetensors").stat().st_size}
    stamp = (base / "model.safetensors").stat().st_mtime_ns
    assert ensure_baseline(load(cfg_file, sets)) == base
    assert (base / "model.safetensors").stat().st_mtime_ns == stamp  # same recipe: reused
    ensure_baseline(load(cfg_file, sets + ["student.keep_layers=[0, 2, 3]"]))
    assert json.loads((base / "config.json").read_text())["num_hidden_layers"] == 3
    build_tiny_model(tmp_path / "other-teacher", num_layers=6, seed=1)
    (out / "baseline_student.partial.killed").mkdir()  # left by a build that was killed
    monkeypatch.chdir(tmp_path)  # a relative teacher path: the task (elsewhere) gets it absolute
    ensure_baseline(load(cfg_file, sets + ["teacher.model=./other-teacher", "student.keep_layers=null"]))
    assert json.loads((base / BASELINE_RECIPE).read_text())["kept"] == [0, 3, 5]  # the new teacher's default
    assert json.loads((base / "config.json").read_text())["num_hidden_layers"] == 3
    assert not list(out.glob("baseline_student.partial*"))
    # importance: measured on the corpus's train rows in the task; switching back to the stride rebuilds
    importance = sets + ["teacher.model=./other-teacher", "student.keep_layers=null", "student.prune.method=importance",
                         "student.prune.num_layers=2", "student.prune.calibration_rows=4"]
    write_corpus(load(cfg_file, importance), n=10, answered=None, varied=True)
    ensure_baseline(load(cfg_file, importance))
    recipe = json.loads((base / BASELINE_RECIPE).read_text())
    assert recipe["prune"]["method"] == "importance" and len(recipe["scores"]) == 6 and len(recipe["kept"]) == 2
    assert recipe["kept"] == sorted(sorted(range(6), key=lambda i: -recipe["scores"][i])[:2])
    assert recipe["calibration_rows_read"] == 4
    from raydistill.layout import baseline_pruning  # what train/student_init.json and report.json say of it

    assert baseline_pruning(load(cfg_file, importance)) == {"prune_method": "importance", "kept": recipe["kept"],
                                                            "scores": recipe["scores"]}
    ensure_baseline(load(cfg_file, sets + ["teacher.model=./other-teacher", "student.keep_layers=null"]))
    assert "prune" not in json.loads((base / BASELINE_RECIPE).read_text())  # rebuilt with the stride
    assert json.loads((base / BASELINE_RECIPE).read_text())["kept"] == [0, 3, 5]
    assert baseline_pruning(load(cfg_file, sets + ["teacher.model=./other-teacher", "student.keep_layers=null"])) == {
        "prune_method": "stride", "kept": [0, 3, 5], "scores": None}


def test_lora_targets_the_student_lacks_fail_before_ray(tiny_model, tmp_path):
    cfg_file, sets = user_config(tmp_path, tiny_model, 30, "hf")
    bad = sets + ["train.lora.enabled=true", "train.lora.target_modules=[qkv_proj]"]
    want = ("train.lora.target_modules: no module named qkv_proj in the student; it has q_proj, k_proj, v_proj, "
            "o_proj, gate_proj, up_proj, down_proj")
    r = CliRunner().invoke(app, ["validate", str(cfg_file), *[x for s in bad for x in ("--set", s)]])
    assert r.exit_code == 2 and want in r.output, r.output
    cfg = load(cfg_file, bad)
    write_corpus(cfg, n=30, answered=None, varied=True)
    with pytest.raises(ModelError) as e:
        run_train(cfg)
    assert str(e.value) == want
    assert not (tmp_path / "run" / "train" / "ray").exists()  # Ray Train never started


def test_validate_refuses_pruning_an_unsupported_architecture(tiny_model, tmp_path):

    neox = tiny_arch(tmp_path / "neox", "neox", tiny_model)
    cfg_file, sets = user_config(tmp_path, tiny_model, 30, "hf")
    r = CliRunner().invoke(app, ["validate", str(cfg_file), *[x for s in sets for x in ("--set", s)],
                                 "--set", f"teacher.model={neox}"])
    assert r.exit_code == 2
    assert "student.init=prune: GPTNeoXForCausalLM (gpt_neox) keeps its decoder layers" in r.output
    assert "supported: Llama-style" in r.output and "OPT: model.decoder.layers; GPT-2: transformer.h" in r.output


def test_a_config_error_on_the_workers_is_not_retried(tiny_model, tmp_path, ray_local, monkeypatch):
    """A bad LoRA target that got past the driver's check fails once, with peft's message."""
    import raydistill.train.stage as trainer

    monkeypatch.setattr(trainer, "check_lora_targets", lambda cfg, student_dir: None)
    cfg_file, sets = user_config(tmp_path, tiny_model, 30, "hf")
    cfg = load(cfg_file, sets + ["train.workers=1", "train.lora.enabled=true", "train.lora.target_modules=[qkv_proj]"])
    write_corpus(cfg, n=30, answered=None, varied=True)
    with pytest.raises(ValueError, match=r"a config error; not retried\): \w+Error: Target modules .*qkv_proj"):
        run_train(cfg)


def test_lora_on_the_teachers_ids_drops_truncated_rows_and_merges_into_attention_only(tiny_model, tmp_path, ray_local,
                                                                                        monkeypatch):
    """One LoRA run on 2 workers checks the labels and the adapters.

    Labels: a corpus made with the student's tokenizer is trained on its stored ids; truncated rows
    are counted, and with truncated_answers=drop left out; every left-out row is in the summary.
    The output_dir is relative (as runs/demo is): Ray Train workers do not run in the driver's
    working directory, so they must be handed absolute paths.
    LoRA: the loss falls from epoch 1 to 2, and the exported student is a plain Llama again whose
    every attention projection, and nothing else, moved."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raydistill.chat import text_ids, tokenizer_fingerprint
    from raydistill.schema import CORPUS_SCHEMA, conform

    cfg_file, sets = user_config(tmp_path, tiny_model, 30, "hf")
    monkeypatch.chdir(tmp_path)
    cfg = load(cfg_file, sets + ["output_dir=run", "train.epochs=2", "train.truncated_answers=drop",
                                 "train.lora.enabled=true", "train.lora.r=4", "train.lr=1e-2"])
    assert cfg.train.workers == 2
    write_corpus(cfg, n=30, answered=None, varied=True)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    corpus = Path(cfg.output_dir) / "corpus"
    shard = corpus / "data" / "part-00000.parquet"
    rows = pq.read_table(shard).to_pylist()
    spelled = [i for ch in "Paris" for i in text_ids(tok, ch)]
    train_rows = [r for r in rows if r["split"] == "train"]
    for r in rows:
        r.update(response="Paris", response_token_ids=spelled + [tok.eos_token_id], finish_reason="stop")
    train_rows[0].update(finish_reason="length", response_token_ids=spelled)
    train_rows[1].update(finish_reason="error", error="prompt too long", response="", response_token_ids=[])
    pq.write_table(conform(pa.Table.from_pylist(rows), CORPUS_SCHEMA), shard)
    manifest = json.loads((corpus / "manifest.json").read_text())
    manifest.update(teacher_tokenizer=tokenizer_fingerprint(tok), stop_token_ids=[tok.eos_token_id])
    (corpus / "manifest.json").write_text(json.dumps(manifest))
    summary = run_train(cfg)
    out = Path(cfg.output_dir)
    n_train = len(train_rows)
    uneven = (n_train - 2) % 2  # each of the 2 workers trains the same number of examples
    assert summary["label_source"] == "teacher_token_ids"
    assert summary["truncated_rows"] == 1 and summary["truncated_action"] == "dropped"
    assert summary["dropped"] == {"error": 1, "truncated": 1, "too_long": 0, "uneven_split": uneven}
    assert summary["examples"] == n_train - 2
    # the tokens trained per epoch: each example's labels are the 5 spelled ids + <|im_end|>\n
    history = _metrics(out)
    for epoch in (0, 1):
        assert sum(m["tokens"] for m in history if m["epoch"] == epoch) == (n_train - 2 - uneven) * (len(spelled) + 2)
    # the training loss over the same rows, epoch 2 vs epoch 1 (token-weighted: single steps are noisy)
    mean = {e: sum(m["loss"] * m["tokens"] for m in history if m["epoch"] == e)
            / sum(m["tokens"] for m in history if m["epoch"] == e) for e in (0, 1)}
    assert mean[1] < mean[0], history
    student = AutoModelForCausalLM.from_pretrained(out / "student")  # merged: a plain Llama again
    assert not any("lora" in n for n, _ in student.named_parameters())
    base = dict(AutoModelForCausalLM.from_pretrained(out / "baseline_student").named_parameters())
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, base[n])}
    targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    assert changed and all(any(t in n for t in targets) for n in changed), changed
    assert all(any(f"{t}.weight" in n for n in changed) for t in targets)  # every target got a delta


def test_resume_after_an_interruption_and_a_finished_run_skipped_refused_or_overwritten(tiny_model, tmp_path,
                                                                                     ray_local, monkeypatch):
    """Interrupted: batches change every epoch; the run resumes from its latest checkpoint even when
    Ray's own record lags, sees the same batches and follows the schedule of its new length; only
    train.keep_checkpoints checkpoints stay; with another setting (lr) it starts afresh. Finished:
    `raydistill run` after a failed evaluate skips it (student/ untouched, no training step); other
    settings are refused, naming them; --overwrite trains again from step 1."""
    from ray.train.torch import TorchTrainer

    import raydistill.evaluate
    import raydistill.train.stage

    cfg_file, sets = user_config(tmp_path, tiny_model, 30, "hf")
    sets += ["train.epochs=2", "train.checkpoint_every_steps=1", "train.keep_checkpoints=100",
             "train.delete_checkpoints=false"]
    cfg = load(cfg_file, sets)
    write_corpus(cfg, n=30, answered=None, varied=True)
    out = Path(cfg.output_dir)
    train_dir = out / "train"
    first = run_train(cfg)
    a = _metrics(out)
    per_epoch = first["steps"] // 2
    assert per_epoch >= 3 and first["resumed_from_step"] is None
    assert first["dropped"]["uneven_split"] == first["examples"] % 2
    tokens = [m["tokens"] for m in a]
    assert tokens[:per_epoch] != tokens[per_epoch:]  # epoch 1 is not epoch 0 again
    assert _steps_on_disk(out) == list(range(1, 2 * per_epoch + 1))

    # Interrupted after step 4 (no summary.json yet): later checkpoints gone, Ray's record still names them.
    (train_dir / "summary.json").unlink()
    for d in checkpoint_dirs(train_dir / "ray"):
        if checkpoint_step(d) > 4:
            d.delete()
    resumed = run_train(load(cfg_file, sets + ["train.epochs=3", "train.keep_checkpoints=2"]))
    b = _metrics(out)
    total = 3 * per_epoch
    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == total
    assert [m["step"] for m in b] == list(range(1, total + 1))
    assert b[:4] == a[:4]  # steps 1-4 come from the checkpoint, not redone
    assert [m["tokens"] for m in b[4:2 * per_epoch]] == tokens[4:]  # the same batches as uninterrupted
    # ... from the same weights: step 5's loss (measured before its update, whose rate follows the new
    # length) is the uninterrupted run's
    assert b[4]["loss"] == pytest.approx(a[4]["loss"], rel=1e-5)
    assert [m["tokens"] for m in b[2 * per_epoch:]] != tokens[:per_epoch]
    # after the resume, the schedule of the new length: what an uninterrupted 3-epoch run uses
    peak, warmup = cfg.train.lr, warmup_steps(total, cfg.train.warmup_ratio)
    assert [m["lr"] for m in b[4:]] == pytest.approx([peak * lr_lambda(s, total, warmup) for s in range(4, total)])
    assert _steps_on_disk(out) == [total - 1, total]  # train.keep_checkpoints=2

    # Interrupted again, but with another learning rate: the checkpoints do not apply, start afresh.
    (train_dir / "summary.json").unlink()
    changed = run_train(load(cfg_file, sets + ["train.epochs=1", "train.lr=1e-2"]))
    assert changed["steps"] == per_epoch and changed["resumed_from_step"] is None
    assert [m["step"] for m in _metrics(out)] == list(range(1, per_epoch + 1))

    # Finished, then evaluate failed: `raydistill run` again skips generate and train.
    finished_sets = sets + ["train.epochs=1", "train.lr=1e-2"]
    args = [x for s in finished_sets for x in ("--set", s)]
    student = out / "student"
    files = {p.name: p.stat().st_mtime_ns for p in student.iterdir()}
    metrics = (train_dir / "metrics.jsonl").read_text()

    def no_training(self):
        raise AssertionError("a finished training ran again")

    def evaluate_fails(cfg, overwrite=False):
        raise ValueError("the evaluation engine died")

    monkeypatch.setattr(TorchTrainer, "fit", no_training)
    monkeypatch.setattr(raydistill.evaluate, "run_evaluate", evaluate_fails)
    for _ in range(2):
        result = CliRunner().invoke(app, ["run", str(cfg_file), *args])
        assert result.exit_code == 2 and "the evaluation engine died" in result.output, result.output
    assert {p.name: p.stat().st_mtime_ns for p in student.iterdir()} == files  # not deleted, not rewritten
    assert (train_dir / "metrics.jsonl").read_text() == metrics
    # Another setting: refused with the difference, nothing deleted.
    result = CliRunner().invoke(app, ["train", str(cfg_file), *[x for s in sets + ["train.epochs=1"]
                                                                for x in ("--set", s)]])
    assert result.exit_code == 2 and "train.lr: 0.01 -> 0.003" in result.output and "--overwrite" in result.output
    assert {p.name: p.stat().st_mtime_ns for p in student.iterdir()} == files
    # --overwrite: a new run starts from step 1 with the new settings: once the reset is done (when
    # the examples are tokenized, before Ray Train starts), no checkpoint is left to resume from and
    # the old student and metrics are gone. (The run itself would be the first run of this test
    # again, so it is stopped there.)
    assert checkpoint_dirs(train_dir / "ray")  # train.delete_checkpoints=false: the finished run's are there
    seen = {}

    def plan_from_scratch(cfg, manifest, corpus, student_, labels, resumed_from):
        seen.update(checkpoints=checkpoint_dirs(train_dir / "ray"), student=student.exists(),
                    metrics=(train_dir / "metrics.jsonl").exists(), summary=(train_dir / "summary.json").exists(),
                    resumed_from=resumed_from)
        raise KeyboardInterrupt

    monkeypatch.setattr(raydistill.train.stage, "plan_run", plan_from_scratch)
    with pytest.raises(KeyboardInterrupt):
        run_train(load(cfg_file, sets + ["train.epochs=1"]), overwrite=True)
    assert seen == {"checkpoints": [], "student": False, "metrics": False, "summary": False, "resumed_from": None}


def _run_cli_train(cfg_file: Path, sets: list[str], stop_after_step: int) -> tuple[int, str]:
    """`raydistill train` in its own process group; Ctrl-C (SIGINT to the group, as a terminal
    sends it) once step ``stop_after_step`` is printed. Returns (exit status, output)."""
    cmd = [sys.executable, "-m", "raydistill.cli", "train", str(cfg_file), *[x for s in sets for x in ("--set", s)]]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    reached = threading.Event()

    def read():
        for line in p.stdout:
            lines.append(line)
            if f"[raydistill] step {stop_after_step}/" in line:
                reached.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert reached.wait(400), "training never reached step %d:\n%s" % (stop_after_step, "".join(lines[-40:]))
        os.killpg(p.pid, signal.SIGINT)
        rc = p.wait(180)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    return rc, "".join(lines)


@pytest.mark.slow
def test_ctrl_c_exits_130_and_the_next_run_resumes_from_the_latest_checkpoint(tiny_model, tmp_path, ray_local):
    cfg_file, sets = user_config(tmp_path, tiny_model, 30, "hf")
    sets += ["train.epochs=50", "train.checkpoint_every_steps=1"]
    write_corpus(load(cfg_file, sets), n=30, answered=None, varied=True)
    rc, output = _run_cli_train(cfg_file, sets, stop_after_step=3)
    assert rc == 130, output[-3000:]
    assert "interrupted during stage train" in output
    out = tmp_path / "run"
    assert not (out / "student").exists() and not (out / "train" / "summary.json").exists()
    written = _steps_on_disk(out)
    # step 3 is printed before its checkpoint is saved: the signal may come first, step 2's is there
    assert written and written[-1] >= 2
    summary = run_train(load(cfg_file, sets + [f"train.max_steps={written[-1] + 1}"]))
    assert summary["resumed_from_step"] == written[-1]  # not one checkpoint earlier
    assert summary["steps"] == written[-1] + 1
    assert not list((out / "train" / "ray").glob("checkpoint_*"))  # train.delete_checkpoints (default): none left


def test_the_resume_key_ignores_where_the_workers_run():
    """train.accelerator_type only picks nodes: a run interrupted on A100s resumes on H100s, and a
    key saved before the field existed still matches (a mismatch would delete the checkpoints)."""
    from raydistill.train.stage import resume_key

    keys = [resume_key(load(None, ["train.use_gpu=true", *sets]), {"rows": 3})
            for sets in ([], ["train.accelerator_type=A100"], ["train.accelerator_type=H100"])]
    assert keys[0] == keys[1] == keys[2] and "accelerator_type" not in keys[0]["train"]
    assert resume_key(load(None, ["train.use_gpu=true", "train.workers=4"]), {"rows": 3}) != keys[0]


def test_export_and_early_stopping_change_the_student_but_not_the_resume_key(tmp_path):
    """Changing train.export or train.early_stopping_patience on an interrupted run keeps its
    checkpoints (the resume key ignores them: what was trained so far is the same), while a
    finished training made with other values is a different student (the stage record differs)."""
    from raydistill.train.stage import resume_key, train_stage

    base = [f"output_dir={tmp_path}"]
    other = base + ["train.export=best", "train.early_stopping_patience=2"]
    assert resume_key(load(None, base), {"rows": 3}) == resume_key(load(None, other), {"rows": 3})
    a, b = (train_stage(load(None, sets), {"rows": 3}).settings["train"] for sets in (base, other))
    assert (a["export"], a["early_stopping_patience"]) != (b["export"], b["early_stopping_patience"])
    assert {k: v for k, v in a.items() if k not in ("export", "early_stopping_patience")} == \
        {k: v for k, v in b.items() if k not in ("export", "early_stopping_patience")}


def test_resuming_with_a_run_shorter_than_the_checkpoint_is_refused_up_front(tiny_model, tmp_path):
    """An interrupted run at step 50 resumed with train.max_steps=2 used to "finish" and then fail
    without a final checkpoint; now it says what to change before Ray starts."""
    from raydistill.corpus import read_manifest
    from raydistill.train.checkpoints import write_meta
    from raydistill.train.stage import resume_key

    cfg_file, sets = user_config(tmp_path, tiny_model, 30, "hf")
    cfg = load(cfg_file, sets + ["train.max_steps=2"])
    write_corpus(cfg, n=30, answered=None, varied=True)
    train_dir = Path(cfg.output_dir) / "train"
    ckpt = train_dir / "ray" / "checkpoint_2026-11-29_00-00-00.000000"
    ckpt.mkdir(parents=True)
    (ckpt / "state.pt").write_bytes(b"x")
    write_meta(ckpt, 50, final=False)
    (train_dir / "resume_key.json").write_text(json.dumps(resume_key(cfg, read_manifest(train_dir.parent / "corpus"))))
    with pytest.raises(ValueError, match=r"already trained 50 steps, past this run's length of 2 steps "
                                         r"\(train.epochs=4, train.max_steps=2\)"):
        run_train(cfg)
    assert ckpt.is_dir()  # nothing already produced is lost


def test_a_refused_rerun_keeps_the_previous_student_and_checkpoints(tiny_model, tmp_path):
    """Refusals (here LoRA targets the student lacks, and mlflow missing) come before train deletes
    anything an earlier run wrote."""
    cfg_file, sets = user_config(tmp_path, tiny_model, 30, "hf")
    cfg = load(cfg_file, sets)
    write_corpus(cfg, n=30, answered=None, varied=True)
    out = Path(cfg.output_dir)
    (out / "student").mkdir(parents=True)
    (out / "student" / "config.json").write_text("{}")
    ckpt = out / "train" / "ray" / "checkpoint_2026-11-30_00-00-00.000000"
    ckpt.mkdir(parents=True)
    (out / "train" / "summary.json").write_text("{}")
    with pytest.raises(ModelError):
        run_train(load(cfg_file, sets + ["train.lora.enabled=true", "train.lora.target_modules=[qkv_proj]"]))
    import importlib.util

    from raydistill.train.observe import MlflowMissingError

    if importlib.util.find_spec("mlflow") is None:  # mlflow is optional and not installed by make
        with pytest.raises(MlflowMissingError, match="pip install mlflow"):
            run_train(load(cfg_file, sets + ["train.mlflow.enabled=true"]))
    assert (out / "student" / "config.json").is_file() and ckpt.is_dir() and (out / "train" / "summary.json").is_file()
