"""raydistill.train.parallel on 2 gloo ranks (Ray Train, 2 workers × 1 CPU): DDP, FSDP2 and
FSDP2 + LoRA train a tiny Llama; the gathered state dict becomes a from_pretrained folder whose
logits equal the worker's; the gathered optimizer state resumes a run exactly."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

from raydistill.train import parallel

PROBE = [[3, 4, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17, 18]]  # (batch 2, seq 8) token ids
RUNS = {  # name: (strategy, lora, precision)
    "ddp": ("ddp", False, "fp32"),
    "fsdp": ("fsdp", False, "bf16"),  # bf16 autocast on CPU under FSDP2
    "fsdp-lora": ("fsdp", True, "fp32"),
}


def _worker(c: dict) -> None:
    """For each run in ``c["runs"]``: train 2 steps, gather and save (checkpoint, HF folder,
    logits), take step 3; then rebuild the model, resume from the checkpoint, take step 3 again."""
    import ray.train
    import torch
    from transformers import AutoModelForCausalLM

    from raydistill.train import parallel as P

    torch.set_num_threads(1)
    rank = ray.train.get_context().get_world_rank()

    def build(r: dict):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(c["model"], dtype=torch.float32)
        if r["lora"]:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                     target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        model = P.wrap_model(model, r["strategy"], use_gpu=False)
        params = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)

    def step(r: dict, model, opt, i: int) -> float:
        g = torch.Generator().manual_seed(100 * i + rank)  # each rank its own batch
        x = torch.randint(3, c["vocab"], (2, 12), generator=g)
        with P.autocast(False, r["precision"]):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        norm = P.clip_grad_norm(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return norm

    for r in c["runs"]:
        out = Path(r["out"])
        model, opt = build(r)
        norms = [step(r, model, opt, i) for i in range(2)]
        state, optim = P.full_state_dict(model), P.optimizer_state(model, opt)
        # what a checkpoint holds: the trainable weights (a LoRA run's adapters only)
        trainable = P.full_state_dict(model, trainable_only=True)
        model.eval()
        with torch.no_grad():  # a forward is a collective under FSDP: every rank runs it
            logits = model(input_ids=torch.tensor(PROBE)).logits
        model.train()
        if rank == 0:
            P.save_hf(P.unwrap(model), state, out / "hf")
            torch.save(logits, out / "logits.pt")
            torch.save({"model": trainable, "optimizer": optim}, out / "ckpt.pt")
            (out / "norms.json").write_text(json.dumps(norms))
        else:
            assert state is None and optim is None and trainable is None
        step(r, model, opt, 2)
        uninterrupted = P.full_state_dict(model)

        model, opt = build(r)
        ckpt = torch.load(out / "ckpt.pt", weights_only=True) if rank == 0 else None  # rank 0 reads, all load
        P.load_full_state_dict(model, ckpt and ckpt["model"], trainable_only=True)
        P.load_optimizer_state(model, opt, ckpt and ckpt["optimizer"])
        step(r, model, opt, 2)
        resumed = P.full_state_dict(model)
        if rank == 0:
            torch.save({"uninterrupted": uninterrupted, "resumed": resumed, "checkpoint": ckpt["model"]},
                       out / "resume.pt")


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory, ray_local):
    """One Ray Train job, 2 workers × 1 CPU, doing every run of RUNS in turn (one worker start-up
    for all three); yields {name: {"out": folder, "lora": bool}}."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from transformers import AutoConfig

    base = tmp_path_factory.mktemp("parallel")
    todo = {name: {"out": str(base / name), "strategy": s, "lora": lora, "precision": p}
            for name, (s, lora, p) in RUNS.items()}
    for r in todo.values():
        Path(r["out"]).mkdir()
    c = {"model": str(tiny_model), "vocab": AutoConfig.from_pretrained(tiny_model).vocab_size,
         "runs": list(todo.values())}
    TorchTrainer(_worker, train_loop_config=c,
                 scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                 run_config=ray.train.RunConfig(name="run", storage_path=str(base / "ray"))).fit()
    return {name: {"out": Path(r["out"]), "lora": r["lora"]} for name, r in todo.items()}


@pytest.fixture(params=list(RUNS))
def run(request, runs):
    return runs[request.param]


def test_gathered_state_dict_loads_with_from_pretrained(run, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).state_dict()
    student = AutoModelForCausalLM.from_pretrained(run["out"] / "hf", dtype=torch.float32)
    trained = student.state_dict()
    assert set(trained) == set(original)
    for name, before in original.items():
        assert trained[name].shape == before.shape, name
    changed = {n for n in original if not torch.equal(trained[n], original[n])}
    if run["lora"]:  # the adapters (q_proj, v_proj) were merged into their base weights
        assert changed == {n for n in original if n.endswith(("q_proj.weight", "v_proj.weight"))}
    else:
        assert changed == set(original), f"unchanged: {sorted(set(original) - changed)}"
    with torch.no_grad():
        logits = student(input_ids=torch.tensor(PROBE)).logits
    torch.testing.assert_close(logits, torch.load(run["out"] / "logits.pt"), rtol=1e-5, atol=1e-5)
    norms = json.loads((run["out"] / "norms.json").read_text())
    assert len(norms) == 2 and all(n > 0 for n in norms)


def test_resumed_step_matches_the_uninterrupted_step(run):
    import torch

    r = torch.load(run["out"] / "resume.pt", weights_only=True)
    assert set(r["resumed"]) == set(r["uninterrupted"])
    if run["lora"]:  # the checkpoint held the adapters only; the frozen base came from the student
        assert r["checkpoint"] and all(".lora_" in n for n in r["checkpoint"])
    else:
        assert set(r["checkpoint"]) == set(r["resumed"])
    moved = [n for n in r["checkpoint"] if not torch.equal(r["resumed"][n], r["checkpoint"][n])]
    assert moved, "the resumed step changed no weight"
    for name, value in r["uninterrupted"].items():
        assert torch.equal(r["resumed"][name], value), name


def test_outside_a_process_group_the_helpers_act_on_the_plain_model(tiny_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(input_ids=torch.tensor(PROBE), labels=torch.tensor(PROBE)).loss.backward()
    assert parallel.clip_grad_norm(model, 1.0) > 0
    opt.step()
    state, optim = parallel.full_state_dict(model), parallel.optimizer_state(model, opt)
    assert "lm_head.weight" in state and set(optim["state"]) >= {"model.embed_tokens.weight"}
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    parallel.load_full_state_dict(fresh, state)
    parallel.load_optimizer_state(fresh, fresh_opt, optim)
    assert torch.equal(fresh.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(ValueError, match="rank 0 needs the full state dict"):
        parallel.load_full_state_dict(fresh, None)
    with pytest.raises(ValueError, match="train.strategy='zero3'"):
        parallel.wrap_model(model, "zero3", use_gpu=False)


def test_autocast_picks_bf16_only_where_asked():
    import torch

    assert isinstance(parallel.autocast(False, "auto"), contextlib.nullcontext)
    assert isinstance(parallel.autocast(False, "fp32"), contextlib.nullcontext)
    assert isinstance(parallel.autocast(True, "fp32"), contextlib.nullcontext)
    a, b = torch.randn(4, 8), torch.randn(8, 4)
    with parallel.autocast(False, "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with parallel.autocast(False, "auto"):
        assert (a @ b).dtype == torch.float32
    with pytest.raises(ValueError, match="train.precision='fp16'"):
        parallel.autocast(False, "fp16")


@pytest.mark.gpu
@pytest.mark.skipif("not __import__('torch').cuda.is_available()")
def test_autocast_on_gpu_is_bf16():
    import torch

    for precision in ("auto", "bf16"):
        with parallel.autocast(True, precision):
            assert (torch.randn(4, 8, device="cuda") @ torch.randn(8, 4, device="cuda")).dtype == torch.bfloat16
