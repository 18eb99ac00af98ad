"""GPU smoke check of the training loop's own code, without Ray or vLLM, in one command:

    python -m raydistill.train.smoke                 # one GPU: NCCL, bf16, FSDP2
    python -m raydistill.train.smoke --device cpu    # the same on CPU with gloo (a tiny model, seconds)

It builds a Llama from a config (no download), starts a ``torch.distributed`` process group of
world size 1 (NCCL on CUDA, gloo on CPU) and drives ``loop.train_loop`` with synthetic batches:

1. sequence KD, full fine-tune, FSDP2 (``fully_shard``) with bf16 autocast on GPU, grad
   accumulation 2: an uninterrupted run of ``--steps`` steps, timed (step time, tokens/s, MFU =
   6 · N · tokens / step time / peak, with the peak named in the output);
2. the same run stopped after half the steps and resumed from its checkpoint: its losses and
   final weights are compared with the uninterrupted run's;
3. logit KD from top-k teacher logprobs with LoRA (dropout on, frozen base in the export dtype):
   its checkpoint holds the adapters only;
4. the exported student (``hf/`` of the final checkpoint) loaded back with ``from_pretrained``:
   its logits are compared with the trained model's.

The last output line is one JSON object with every figure and check (``ok`` true when all
passed). Exit status 0 when ok. Imports neither Ray nor pydantic.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # bf16 dense, vendor figures


def settings(**kw) -> SimpleNamespace:
    """The ``TrainConfig`` attributes the loop reads, with TrainConfig's defaults (no pydantic)."""
    kd = SimpleNamespace(teacher="corpus", alpha=0.5, temperature=1.0, divergence="forward_kl", beta=0.5,
                         chunk_size=256)
    lora = SimpleNamespace(enabled=False, r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"])
    base = dict(use_gpu=False, strategy="ddp", precision="auto", loss="sequence_kd", kd=kd, batch_size=2,
                grad_accum_steps=1, packing=False, lr=5e-4, weight_decay=0.0, grad_clip=1.0, seed=0,
                checkpoint_every_steps=0, keep_checkpoints=2, export="last", early_stopping_patience=None, lora=lora)
    for k, v in kw.items():
        if k in ("kd", "lora"):
            for kk, vv in v.items():
                setattr(base[k], kk, vv)
        else:
            base[k] = v
    return SimpleNamespace(**base)


def build_student(folder: Path, *, hidden: int, layers: int, heads: int, vocab: int, seed: int = 0) -> Path:
    """A random-weight Llama saved with ``save_pretrained`` (fp32) into ``folder``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64 or 64,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=4096, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def synthetic_batches(n: int, batch: int, seq: int, vocab: int, top_k: int = 0, seed: int = 0) -> list[dict]:
    """``n`` collated micro-batches (``examples.collate``'s keys, CPU tensors): random token ids,
    labels on the second half of each row (the answer), and with ``top_k`` a teacher's top-k ids
    and log-probabilities at every label position (a random softmax)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (batch, seq), generator=g)
        labels = ids.clone()
        labels[:, : seq // 2] = -100
        m = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(seq).expand(batch, seq).clone(),
             "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
        if top_k:
            lp = torch.randn(batch, seq, vocab, generator=g).log_softmax(-1)
            top = lp.topk(top_k, dim=-1)
            m["kd_mask"] = labels != -100
            m["topk_ids"] = top.indices
            m["topk_logprobs"] = torch.where(m["kd_mask"][..., None], top.values, torch.tensor(float("-inf")))
        out.append(m)
    return out


def init_process_group(device) -> None:
    """A world-size-1 process group: NCCL on CUDA, gloo on CPU (a file store in a temp folder)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    store = tempfile.mkdtemp(prefix="raydistill-pg-")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{store}/store",
                            rank=0, world_size=1, **({"device_id": device} if device.type == "cuda" else {}))


def run_phase(student: Path, t, batches: list[dict], *, steps: int, ray_dir: Path, device):
    """Build the student as the Ray adapter does, wrap it (FSDP2 / DDP on ``device``) and run
    ``train_loop`` for ``steps`` steps, resuming from the latest checkpoint in ``ray_dir``.
    Returns (history, wrapped model)."""
    import torch
    from transformers import AutoModelForCausalLM

    from . import parallel
    from .loop import CheckpointStore, Collectives, student_load_dtype, train_loop
    from .plan import Plan

    torch.manual_seed(t.seed)
    model = AutoModelForCausalLM.from_pretrained(student, dtype=student_load_dtype(t))
    if t.lora.enabled:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=t.lora.r, lora_alpha=t.lora.alpha, lora_dropout=t.lora.dropout,
                                                 target_modules=t.lora.target_modules, task_type="CAUSAL_LM"))
    model = parallel.wrap_model(model, t.strategy, t.use_gpu, device=device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.lr, weight_decay=t.weight_decay)
    accum = t.grad_accum_steps
    plan = Plan(total_steps=steps, warmup_steps=max(1, steps // 10), steps_per_epoch=steps,
                micro_per_epoch=steps * accum)
    history = train_loop(model, opt, t=t, plan=plan, rank=0, world=1, device=device,
                         collectives=Collectives(device, 1), train_batches=lambda epoch: iter(batches),
                         collate=lambda m: m, store=CheckpointStore(ray_dir, keep=2), say=lambda s: None)
    return history, model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (NCCL, bf16, FSDP2) or cpu (gloo, fp32)")
    p.add_argument("--hidden", type=int, default=None, help="hidden size (default: 2048 on cuda, 64 on cpu)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: 16 on cuda, 2 on cpu)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary (default: 32000 on cuda, 128 on cpu)")
    p.add_argument("--seq", type=int, default=None, help="tokens per row (default: 1024 on cuda, 16 on cpu)")
    p.add_argument("--batch", type=int, default=None, help="rows per micro-batch (default: 8 on cuda, 2 on cpu)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (even; default 8 on cuda, 4 on cpu)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the accelerator's peak dense bf16 TFLOP/s for MFU (default: the vendor figure for "
                        "H100/H200 989, A100 312; none on CPU)")
    p.add_argument("--out", default=None, help="work folder (default: a temp folder, removed)")
    a = p.parse_args(argv)

    import torch

    device = torch.device(a.device)
    gpu = device.type == "cuda"
    if gpu:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --device cpu", file=sys.stderr)
            return 2
        device = torch.device("cuda", torch.cuda.current_device())
    hidden, layers = a.hidden or (2048 if gpu else 64), a.layers or (16 if gpu else 2)
    vocab, seq, batch = a.vocab or (32000 if gpu else 128), a.seq or (1024 if gpu else 16), a.batch or (8 if gpu else 2)
    steps = a.steps or (8 if gpu else 4)
    steps += steps % 2
    heads = max(1, hidden // 128) if gpu else 2
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    if gpu:  # the resume check compares runs: deterministic kernels (embedding backward without atomics)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    init_process_group(device)
    result: dict = {"device": torch.cuda.get_device_name(device) if gpu else "cpu",
                    "backend": "nccl" if gpu else "gloo", "torch": torch.__version__, "checks": {}}
    work = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="raydistill-smoke-"))
    try:
        student = build_student(work / "student", hidden=hidden, layers=layers, heads=heads,  # not a run folder
                                vocab=vocab)
        accum = 2
        common = dict(use_gpu=gpu, strategy="fsdp", precision="auto" if gpu else "fp32", grad_accum_steps=accum,
                      batch_size=batch, checkpoint_every_steps=steps // 2)
        data = synthetic_batches(steps * accum, batch, seq, vocab)
        # 1. sequence KD, uninterrupted (timed)
        t = settings(**common)
        hist, model = run_phase(student, t, data, steps=steps, ray_dir=work / "full", device=device)
        n_params = sum(p.numel() for p in model.parameters())  # FSDP2 DTensors count their global size
        secs = [h["seconds"] for h in hist[1:]] or [hist[0]["seconds"]]  # the first step pays for warm-up
        step_s = sum(secs) / len(secs)
        tokens = batch * seq * accum
        peak = a.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in result["device"]), None)
        flops = 6 * n_params * tokens / step_s
        result.update(mfu_formula="6 * params * tokens / step_s / peak (params: all, embeddings and head "
                                  "included; attention's quadratic term left out)", params=n_params, tokens_per_step=tokens, step_s=round(step_s, 4),
                      tokens_per_s=round(tokens / step_s, 1), tflops=round(flops / 1e12, 2),
                      peak_tflops=peak, mfu=round(flops / (peak * 1e12), 4) if peak else None,
                      losses=[h["loss"] for h in hist])
        from . import parallel

        full_state = parallel.full_state_dict(model)
        # 2. interrupted after the checkpoint at half the steps (only that one left), then resumed
        import shutil

        name = f"checkpoint_{steps // 2:09d}"
        shutil.copytree(work / "full" / name, work / "resumed" / name)
        rest, resumed_model = run_phase(student, t, data, steps=steps, ray_dir=work / "resumed", device=device)
        resumed_state = parallel.full_state_dict(resumed_model)
        loss_diff = max(abs(x["loss"] - y["loss"]) for x, y in zip(hist, rest)) if len(rest) == steps else float("inf")
        w_diff = max(float((full_state[k].float() - resumed_state[k].float()).abs().max()) for k in full_state)
        result["checks"]["resume_matches"] = {"max_loss_diff": loss_diff, "max_weight_diff": w_diff,
                                              "ok": loss_diff <= (1e-3 if gpu else 1e-6) and w_diff <= (1e-3 if gpu else 1e-6)}
        # 3. logit KD + LoRA with dropout: the checkpoint holds the adapters only
        tl = settings(**common, loss="logit_kd", lora={"enabled": True, "dropout": 0.1})
        kd_data = synthetic_batches(steps * accum, batch, seq, vocab, top_k=8, seed=1)
        kd_hist, kd_model = run_phase(student, tl, kd_data, steps=steps, ray_dir=work / "lora", device=device)
        from .checkpoints import latest_checkpoint, load_state

        final_dir, _ = latest_checkpoint(work / "lora")
        saved = load_state(final_dir)["model"]
        result["checks"]["lora_checkpoint_adapters_only"] = {
            "tensors": len(saved), "ok": bool(saved) and all(".lora_" in k for k in saved),
            "state_mb": round((final_dir.local() / "state.pt").stat().st_size / 2**20, 2)}
        result["kd_losses"] = [h["loss"] for h in kd_hist]
        # 4. the exported student loads back and gives the trained model's logits
        from transformers import AutoModelForCausalLM

        exported = AutoModelForCausalLM.from_pretrained(latest_checkpoint(work / "full")[0].local() / "hf").to(device)
        probe = data[0]["input_ids"][:1].to(device)
        with torch.no_grad(), parallel.autocast(gpu, t.precision):
            want = model(input_ids=probe).logits.float()
            got = exported(input_ids=probe).logits.float()
        diff = float((want - got).abs().max())
        result["checks"]["export_loads"] = {"dtype": str(next(exported.parameters()).dtype).removeprefix("torch."),
                                            "max_logit_diff": round(diff, 5),
                                            "ok": diff <= (0.1 if gpu else 1e-4)}
        finite = all(map(lambda v: v == v and abs(v) != float("inf"), result["losses"] + result["kd_losses"]))
        result["checks"]["finite_losses"] = {"ok": finite}
        result["ok"] = all(c["ok"] for c in result["checks"].values())
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        if not a.out:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
