"""The train stage as a cluster runs it: a worker lost mid-run, and a run whose every output is in S3."""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from typer.testing import CliRunner

from raydistill.cli import app
from raydistill.config import load
from raydistill.storage import local_copy, storage_path
from raydistill.train.checkpoints import META_FILE, STATE_FILE, checkpoint_dirs, latest_checkpoint, read_meta
from raydistill.train.stage import run_train

from .conftest import make_bucket
from .helpers import s3_files, user_config, write_corpus

TRAIN_WORKER = "RayTrainWorker"  # Ray Train 2.60's worker actor class (ray.train.v2 ... worker_group.worker)


def _alive_train_workers() -> list[int]:
    """Pids of this session's live Ray Train worker actors, from the GCS actor table.

    ``ray.util.state.list_actors`` would say the same but needs the dashboard, which
    ``raydistill.runtime.init_ray`` leaves off; the GCS table is what the dashboard reads."""
    import psutil
    from ray._private.state import actors

    ours = {p.pid for p in psutil.Process().children(recursive=True)}  # never a process outside this test
    return sorted(a["Pid"] for a in actors(actor_state_name="ALIVE").values()
                  if a["ActorClassName"] == TRAIN_WORKER and a["Pid"] in ours)


def _train_worker_ids() -> set[str]:
    from ray._private.state import actors

    return {k for k, a in actors().items() if a["ActorClassName"] == TRAIN_WORKER}


def _resume_lines(earlier: set[str]) -> list[str]:
    """The "resumed from checkpoint" lines in the stdout logs of the Ray Train workers started
    since ``earlier`` (actor ids), read from Ray's log files (forwarding to the driver is
    asynchronous: under load it missed lines)."""
    import ray
    from ray._private.state import actors

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    pids = {a["Pid"] for k, a in actors().items() if a["ActorClassName"] == TRAIN_WORKER and k not in earlier}
    lines = []
    for f in sorted(logs.glob("worker-*.out")):
        if int(f.stem.rsplit("-", 1)[1]) in pids:
            lines += [x for x in f.read_text(errors="replace").splitlines() if "resumed from checkpoint at step " in x]
    return lines


@pytest.mark.slow
def test_a_killed_training_worker_is_replaced_and_the_run_ends_at_its_planned_step(tiny_model, tmp_path, ray_local):
    """SIGKILL one of two DDP workers after its second checkpoint: Ray Train starts a new worker
    group (train.max_failures), every rank resumes from the latest complete checkpoint, and the run
    ends at the planned step with each step recorded once (the steps after the checkpoint are
    redone, and the history is the final checkpoint's)."""
    import psutil

    cfg_file, sets = user_config(tmp_path, tiny_model, 30, "hf")
    cfg = load(cfg_file, sets + ["train.workers=2", "train.epochs=4", "train.checkpoint_every_steps=1",
                                 "train.max_failures=1"])
    write_corpus(cfg, n=30, answered=None, varied=True)
    out = Path(cfg.output_dir)
    ray_dir = out / "train" / "ray"
    result: dict = {}
    earlier = _train_worker_ids()  # the session's Ray may have run other trainings

    def train() -> None:
        try:
            result["summary"] = run_train(cfg)
        except BaseException as e:  # noqa: BLE001 - reported by the test below
            result["error"] = e

    runner = threading.Thread(target=train, daemon=True)
    runner.start()
    deadline = time.time() + 900  # a loaded 2-core machine: minutes before the first step
    while True:
        found = latest_checkpoint(ray_dir) if ray_dir.is_dir() else None
        if found is not None and found[1]["step"] >= 2:
            break
        assert runner.is_alive(), f"training ended before its second checkpoint: {result}"
        assert time.time() < deadline, "no second checkpoint after 900 s"
        time.sleep(0.1)
    workers = _alive_train_workers()
    assert len(workers) == 2, workers
    victim = psutil.Process(workers[-1])
    victim.send_signal(signal.SIGKILL)
    victim.wait(30)
    killed_after = latest_checkpoint(ray_dir)[1]["step"]
    runner.join(1800)
    assert not runner.is_alive(), "training did not finish within 1800 s of the kill"
    assert "error" not in result, repr(result.get("error"))
    summary = result["summary"]

    total = summary["steps"]
    assert total >= 12 and killed_after < total  # the kill landed mid-run
    history = [json.loads(x) for x in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in history] == list(range(1, total + 1))  # each step once, none lost
    assert summary["resumed_from_step"] is None  # the driver did not resume: Ray Train restarted the workers
    resumed = _resume_lines(earlier)
    assert len(resumed) == 1, resumed  # one restart, whose rank 0 said where it resumed
    resumed = [int(resumed[0].split("resumed from checkpoint at step ")[1].split()[0])]
    assert killed_after <= resumed[0] < total
    assert (out / "student" / "config.json").is_file()


@pytest.mark.slow
def test_checkpoints_and_student_in_s3(tiny_model, tmp_path, s3_server):
    """output_dir on S3: the corpus is read, checkpoints, metrics, summary, plot and student are
    written there; the student loads from a local copy and generates; `raydistill train` resumes
    an interrupted S3 run from its S3 checkpoint (evaluate on S3: tests/test_s3_pipeline.py)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bucket = make_bucket(f"raydistill-{uuid.uuid4().hex[:12]}")  # unique: caches are keyed by the URI
    run = f"{bucket}/run"
    cfg_file, sets = user_config(tmp_path, tiny_model, 30, "hf")
    local_cfg = load(cfg_file, sets)
    write_corpus(local_cfg, n=30, answered=None, varied=True)  # into <tmp>/run/corpus, then uploaded
    corpus = storage_path(f"{run}/corpus")
    pafs.copy_files(str(Path(local_cfg.output_dir) / "corpus"), corpus.path,
                    source_filesystem=pafs.LocalFileSystem(), destination_filesystem=corpus.fs)
    s3_sets = sets + [f"output_dir={run}", "train.epochs=2", "train.delete_checkpoints=false",
                     "train.max_failures=0"]  # a failure surfaces at once, not after retries

    summary = run_train(load(cfg_file, s3_sets))
    steps = summary["steps"]
    assert steps >= 2 and summary["resumed_from_step"] is None
    assert summary["student"] == f"{run}/student"
    checkpoints = checkpoint_dirs(f"{run}/train/ray")
    assert checkpoints and all(c.uri.startswith(f"{run}/train/ray/checkpoint_") for c in checkpoints)
    metas = [read_meta(c) for c in checkpoints]
    assert all(m is not None for m in metas)  # complete: every listed file in S3 with its size
    assert max(m["step"] for m in metas) == steps and any(m["final"] for m in metas)
    assert {STATE_FILE, META_FILE} <= s3_files(checkpoints[-1].uri)
    student_files = s3_files(f"{run}/student")
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "raydistill_config.yaml"} <= student_files
    assert any(f.endswith(".safetensors") for f in student_files), student_files
    train_files = s3_files(f"{run}/train")
    assert {"metrics.jsonl", "summary.json", "loss.png", "resume_key.json", "config.yaml"} <= train_files
    metrics = storage_path(f"{run}/train/metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in metrics] == list(range(1, steps + 1))
    assert json.loads(storage_path(f"{run}/train/summary.json").read_text())["steps"] == steps
    assert not (tmp_path / "run" / "train").exists()  # nothing went to the local folder of the corpus

    folder = local_copy(f"{run}/student")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] > ids["input_ids"].shape[1]

    # An interrupted run (no summary.json) resumes from its latest S3 checkpoint, through the CLI.
    storage_path(f"{run}/train/summary.json").delete()
    longer = s3_sets + ["train.epochs=3"]
    r = CliRunner().invoke(app, ["train", str(cfg_file), *[x for s in longer for x in ("--set", s)]])
    assert r.exit_code == 0, r.output + repr(r.exception)
    resumed = json.loads(storage_path(f"{run}/train/summary.json").read_text())
    assert resumed["resumed_from_step"] == steps
    assert resumed["steps"] == steps // 2 * 3
    assert "config.yaml" in s3_files(run)  # the CLI wrote the resolved config beside the outputs
