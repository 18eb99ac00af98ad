"""The GPU smoke check (``python -m raydistill.train.smoke``): on CPU with gloo here (a tiny model,
seconds), on CUDA with NCCL, bf16 and FSDP2 where a GPU is (``gpu`` marker). It imports neither
Ray nor pydantic: the lent GPU machine has neither."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from raydistill.train import smoke

from .helpers import kd_config, write_topk_corpus


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_smoke_runs_on_cpu_with_gloo(capsys):
    rc = smoke.main(["--device", "cpu", "--steps", "2", "--layers", "1", "--hidden", "32", "--seq", "12"])
    out = _last_json(capsys.readouterr().out)
    assert rc == 0 and out["ok"] is True, out
    assert out["backend"] == "gloo" and out["params"] > 0 and out["step_s"] > 0 and out["mfu"] is None
    checks = out["checks"]
    assert checks["resume_matches"]["max_loss_diff"] == 0.0 and checks["resume_matches"]["max_weight_diff"] == 0.0
    assert checks["lora_checkpoint_adapters_only"]["ok"] and checks["export_loads"]["dtype"] == "float32"
    assert len(out["losses"]) == 2 and len(out["kd_losses"]) == 2


def test_smoke_imports_neither_ray_nor_pydantic():
    code = ("import sys, json, raydistill.train.smoke, raydistill.train.loop, raydistill.train.parallel, "
            "raydistill.train.checkpoints, raydistill.train.losses;"
            "print(json.dumps([m for m in ('ray', 'vllm', 'pydantic', 'raydistill.config') if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert _last_json(out.stdout) == []


@pytest.mark.gpu
@pytest.mark.skipif("not __import__('torch').cuda.is_available()")
def test_smoke_on_gpu(capsys):
    """NCCL, bf16 autocast, FSDP2 on one GPU, a bf16 LoRA base and a bf16 export; MFU printed."""
    rc = smoke.main(["--device", "cuda", "--steps", "4", "--layers", "4", "--hidden", "1024", "--seq", "512"])
    out = _last_json(capsys.readouterr().out)
    assert rc == 0 and out["ok"] is True, out
    assert out["backend"] == "nccl" and out["checks"]["export_loads"]["dtype"] == "bfloat16"


@pytest.mark.gpu
@pytest.mark.skipif("not __import__('torch').cuda.is_available()")
@pytest.mark.parametrize("strategy,lora", [("ddp", False), ("fsdp", True)])
def test_ray_train_logit_kd_on_gpus_with_nccl(tiny_model, tmp_path, ray_local, strategy, lora):
    """The Ray path on a GPU machine with Ray installed: Ray Train with use_gpu (NCCL, one GPU per
    worker, up to 2), logit KD from the corpus; the student is exported in bf16."""
    import torch

    from raydistill.train.stage import run_train


    workers = min(2, torch.cuda.device_count())
    sets = [f"train.strategy={strategy}", f"train.workers={workers}", "train.use_gpu=true", "train.epochs=1"]
    if lora:
        sets += ["train.lora.enabled=true", "train.lora.dropout=0.1"]
    cfg = kd_config(tmp_path, tiny_model, 24, sets)
    write_topk_corpus(cfg, tiny_model)
    summary = run_train(cfg)
    assert summary["steps"] >= 1 and summary["exported_step"] == summary["steps"]
    config = json.loads((Path(cfg.output_dir) / "student" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
