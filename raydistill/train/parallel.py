"""Data parallelism for the student inside a Ray Train worker: DDP or FSDP, autocast, and the
full (gathered) model and optimizer state for checkpoints and export.

Every function here runs inside a ``TorchTrainer`` worker, after Ray Train has started the
process group (gloo on CPU, NCCL on GPU). torch and ray are imported inside the functions so
that ``import raydistill`` stays light.

Choices (torch 2.13, Ray 2.60, measured on CPU gloo and read from the installed sources):

- ``ddp``: ``ray.train.torch.prepare_model(model, parallel_strategy="ddp")``: Ray moves the model to
  ``ray.train.torch.get_device()`` and wraps it in ``DistributedDataParallel`` (with ``device_ids``
  on GPU); with one worker it leaves the model unwrapped.
- ``fsdp``: FSDP2, ``torch.distributed.fsdp.fully_shard``, on a 1-D ``DeviceMesh`` over all ranks
  (``"cuda"`` or ``"cpu"``): each decoder layer (the classes in the model's ``_no_split_modules``)
  is its own shard group, then the root (embeddings, final norm, head; tied embeddings stay tied).
  The device is Ray's (``ray.train.torch.get_device()``); ``fully_shard`` moves each layer there as
  it shards it (so the full model never sits on one GPU). Not FSDP1: Ray's
  ``prepare_model(parallel_strategy="fsdp")`` refuses CPU ("FSDP is only available with
  GPU-enabled training"), FSDP1 needs ``use_orig_params=True`` for frozen (LoRA) weights, and
  its own state-dict calls (``FSDP.state_dict_type``) warn that they are deprecated in favour of
  the ``torch.distributed.checkpoint.state_dict`` functions used below. FSDP2 trains on CPU gloo
  here (torch 2.13), with bf16 autocast and with peft LoRA (tests/test_parallel.py).
- state dicts: ``torch.distributed.checkpoint.state_dict.get_model_state_dict`` /
  ``get_optimizer_state_dict`` with ``StateDictOptions(full_state_dict=True, cpu_offload=True)``
  (gathered to rank 0 only, on CPU), loaded back with ``set_model_state_dict`` /
  ``set_optimizer_state_dict`` and ``broadcast_from_rank0=True``. The same calls serve DDP (they
  strip the ``module.`` prefix), so a checkpoint has the same keys (parameter names of the
  unwrapped model, optimizer state keyed by parameter name) whatever the strategy or worker count.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

STRATEGIES = ("ddp", "fsdp")


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist else 0


def _world() -> int:
    dist = _dist()
    return dist.get_world_size() if dist else 1


def is_fsdp(model) -> bool:
    """True when ``model`` was sharded by ``fully_shard`` (FSDP2)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _layer_classes(model) -> set[type]:
    """Classes of the modules that FSDP shards one by one: the names in transformers'
    ``_no_split_modules`` (e.g. ``LlamaDecoderLayer``), looked up in the model itself (a peft
    model forwards the attribute to its base model)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    base = getattr(model, "get_base_model", None)
    if not names and callable(base):
        names = set(getattr(base(), "_no_split_modules", None) or [])
    return {type(m) for m in model.modules() if type(m).__name__ in names}


def wrap_model(model, strategy: str, use_gpu: bool, device=None):
    """Place ``model`` on this worker's device and wrap it for data parallelism.

    Call it once per worker, inside a Ray Train worker (the process group is up), before the
    optimizer is built: build the optimizer from the returned model's ``parameters()`` (under FSDP
    these are the sharded ``DTensor`` parameters).

    Args:
        model: a transformers causal LM (or a peft model around one), fp32, on CPU.
        strategy: ``"ddp"`` (a full copy per rank, gradients all-reduced) or ``"fsdp"`` (FSDP2:
            parameters, gradients and optimizer state sharded over the ranks; each decoder layer
            gathered only while it runs).
        use_gpu: True on GPU workers (NCCL, one GPU per worker: the device comes from
            ``ray.train.torch.get_device()``); False on CPU (gloo).
        device: the worker's device when the process group is not Ray Train's (a Ray-free run:
            ``raydistill.train.smoke``); None: Ray Train's device, and Ray's ``prepare_model`` for ddp.
    Returns:
        The model to train: DDP-wrapped (unwrapped with one worker) for ddp; the same object,
        sharded in place, for fsdp. Use ``unwrap`` for its config or for ``save_hf``.
    Raises:
        ValueError: an unknown strategy, or fsdp on a model with no decoder-layer class in
            ``_no_split_modules`` (nothing to shard layer by layer).
        RuntimeError: ``use_gpu`` is True but this worker sees no CUDA device.
    """
    import torch

    if strategy not in STRATEGIES:
        raise ValueError(f"train.strategy={strategy!r}: expected one of {', '.join(STRATEGIES)}")
    if use_gpu and not torch.cuda.is_available():
        raise RuntimeError("train.use_gpu is true but this Ray Train worker sees no CUDA device "
                           "(check ScalingConfig(use_gpu=True) and CUDA_VISIBLE_DEVICES)")
    if device is None:
        import ray.train.torch

        if strategy == "ddp":
            return ray.train.torch.prepare_model(model, parallel_strategy="ddp")
        device = ray.train.torch.get_device()
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if strategy == "ddp":  # what Ray's prepare_model does: move, and wrap when there is another rank
        model = model.to(device)
        if _world() > 1:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        return model

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    classes = _layer_classes(model)
    if not classes:
        raise ValueError(f"train.strategy=fsdp: {type(model).__name__} names no decoder-layer class in "
                         f"_no_split_modules ({getattr(model, '_no_split_modules', None)!r}); use strategy=ddp")
    # No prepare_model here: it would move the whole model to the GPU before sharding. fully_shard
    # moves each module's own weights to the mesh's device as it shards them, layer by layer, so a
    # GPU holds at most one full layer beside the shards.
    mesh = init_device_mesh(device.type, (_world(),))
    for module in model.modules():
        if type(module) in classes:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def unwrap(model):
    """The module inside the parallel wrapper: a transformers model, or the peft model when LoRA
    is on (``save_hf`` merges its adapters). DDP's ``.module``; an FSDP2 model is sharded in
    place, so it is returned as is (its parameters are ``DTensor`` shards: read weights through
    ``full_state_dict``, not from the module)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _frozen_names(model) -> set[str]:
    """State-dict names of the frozen parameters (``requires_grad`` False) of the unwrapped model."""
    return {n for n, p in unwrap(model).named_parameters(remove_duplicate=False) if not p.requires_grad}


def full_state_dict(model, trainable_only: bool = False) -> dict[str, Any] | None:
    """The full, unsharded model state dict, on CPU, on rank 0; None on the other ranks.

    ``trainable_only``: leave out the frozen parameters (a LoRA run's base weights: a checkpoint
    then holds the adapters alone; buffers and every trained weight stay).

    A collective under FSDP (every rank must call it, in the same order as the other
    collectives). Keys are the unwrapped model's names (``model.layers.0.self_attn.q_proj.weight``;
    peft's names under LoRA), with every tied name present (``lm_head.weight`` beside
    ``model.embed_tokens.weight``); values are CPU tensors in the parameters' own dtypes.
    """
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if _dist() is None:
        frozen = _frozen_names(model) if trainable_only else set()
        return {k: v.detach().to("cpu", copy=True) for k, v in unwrap(model).state_dict().items()
                if isinstance(v, torch.Tensor) and k not in frozen}
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                 ignore_frozen_params=trainable_only))
    if _rank() != 0:
        return None
    if trainable_only:  # DCP keeps a tied frozen weight under its second name (lm_head.weight): drop it too
        frozen = _frozen_names(model)
        state = {k: v for k, v in state.items() if k not in frozen}
    return state


def load_full_state_dict(model, state_dict: dict[str, Any] | None, trainable_only: bool = False) -> None:
    """Load a full state dict (``full_state_dict``'s keys) into the wrapped model, on every rank.

    ``trainable_only``: the dict may lack the frozen parameters (``full_state_dict(...,
    trainable_only=True)``); those keep their loaded values. Any other missing key is an error.

    Rank 0's dict is broadcast and each rank keeps its own shard (FSDP) or copy (DDP); the other
    ranks' argument is ignored (pass None: only rank 0 needs to read the checkpoint). A collective.

    Raises:
        ValueError: rank 0 got None.
        RuntimeError: a key is missing or unexpected (torch's message names it).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if _rank() == 0 and state_dict is None:
        raise ValueError("load_full_state_dict: rank 0 needs the full state dict (got None)")
    if _rank() == 0:
        frozen = _frozen_names(model) if trainable_only else set()
        expected = set(unwrap(model).state_dict()) - frozen
        missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - set(unwrap(model).state_dict()))
        if missing or unexpected:
            raise RuntimeError(f"load_full_state_dict: the state dict does not fit the model: missing "
                               f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected "
                               f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if _dist() is None:
        unwrap(model).load_state_dict(state_dict, strict=not trainable_only)
        return
    set_model_state_dict(model, dict(state_dict) if _rank() == 0 else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                  strict=not trainable_only))


def optimizer_state(model, opt) -> dict[str, Any] | None:
    """The full (gathered) optimizer state, on CPU, on rank 0; None on the other ranks.

    ``{"state": {param name: {"step", "exp_avg", ...}}, "param_groups": [...]}`` keyed by the
    unwrapped model's parameter names (not ids), with full, unsharded tensors: it loads into any
    strategy and worker count. A collective under FSDP.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    if _dist() is None:
        return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    state = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if _rank() == 0 else None


def load_optimizer_state(model, opt, state: dict[str, Any] | None) -> None:
    """Load ``optimizer_state``'s dict into ``opt`` (built over ``model``'s parameters after
    ``wrap_model``), on every rank; rank 0's dict is broadcast, the others' ignored. The model's
    weights must be loaded too (``load_full_state_dict``): the next step then equals the step the
    uninterrupted run would have taken. The param groups' ``lr`` comes back from the checkpoint.

    Raises:
        ValueError: rank 0 got None.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if _rank() == 0 and state is None:
        raise ValueError("load_optimizer_state: rank 0 needs the optimizer state (got None)")
    if _dist() is None:
        set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
        return
    set_optimizer_state_dict(model, opt, state if _rank() == 0 else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def clip_grad_norm(model, max_norm: float) -> float:
    """Clip the global gradient L2 norm of ``model``'s trainable parameters to ``max_norm`` and
    return the norm before clipping, as a float, the same on every rank (under FSDP the norm
    is a ``DTensor`` over the shards: it is reduced, a collective)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


@contextlib.contextmanager
def no_grad_sync(model, skip: bool = True):
    """While ``skip``, backward passes accumulate gradients locally with no cross-rank reduction
    (gradient accumulation: skip on every micro-batch but the last of an optimizer step). DDP's
    ``no_sync``; FSDP2's ``set_requires_gradient_sync(False)``; a no-op for an unwrapped model."""
    from torch.nn.parallel import DistributedDataParallel

    if not skip:
        yield
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif is_fsdp(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def autocast(use_gpu: bool, precision: str):
    """The forward pass's autocast context: bf16 on CUDA for ``precision`` ``bf16`` or ``auto``;
    bf16 on CPU only for ``bf16`` (it is slower than fp32 on CPUs without bf16 units, measured
    here); otherwise ``contextlib.nullcontext()``. Weights, gradients and optimizer state stay
    fp32 either way. Raises ValueError for another ``precision``."""
    import torch

    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"train.precision={precision!r}: expected auto, fp32 or bf16")
    if use_gpu and precision in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if not use_gpu and precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def save_hf(model_unwrapped, state_dict: dict[str, Any], out_dir: str | Path, dtype=None) -> Path:
    """Rank 0 only: write ``state_dict`` (from ``full_state_dict``) as a ``save_pretrained`` folder
    (config, generation config, safetensors) that ``AutoModelForCausalLM.from_pretrained`` loads.

    ``model_unwrapped`` (``unwrap(model)``) gives the config, class and LoRA settings only: its own
    (possibly sharded) weights are not read. Under peft LoRA each adapter is merged into its base
    weight inside the state dict (``W + scaling · B @ A``, peft's formula, with each layer's own
    ``scaling``) and the base model's names are written: no second model is built. The tokenizer
    is the caller's. ``state_dict`` itself is left as it was (transformers deletes tied names from
    the dict it saves; it gets a copy). ``dtype`` (a torch dtype, e.g. bf16 when training ran in
    bf16 on GPU): floating tensors are written in it and ``config.json`` says so; None keeps each
    tensor's dtype. Returns ``out_dir``.

    Raises:
        NotImplementedError: a LoRA variant other than plain LoRA on ``nn.Linear`` (DoRA, LoRA on
            embeddings or convolutions).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model_unwrapped, "merge_and_unload"):
        target = model_unwrapped.get_base_model()
        state = _merged_lora_state(model_unwrapped, state_dict)
    else:
        target = model_unwrapped
        state = dict(state_dict)  # a copy: save_pretrained deletes the tied names (lm_head.weight) from it
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    target.save_pretrained(out, state_dict=state)
    if dtype is not None:  # config.json names the dtype of the weights written, not of the model in memory
        import json

        cfg_file = out / "config.json"
        cfg = json.loads(cfg_file.read_text())
        name = str(dtype).removeprefix("torch.")
        cfg["dtype"] = name
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = name
        cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out


def _merged_lora_state(peft_model, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` (peft's names, full tensors) with every LoRA adapter folded into its base
    weight, under the base model's names (``model.layers.0.self_attn.q_proj.weight``)."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    adapter = peft_model.active_adapter
    merged = dict(state_dict)
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        if not isinstance(module, LoraLinear) or module.use_dora.get(adapter, False):
            raise NotImplementedError(f"save_hf: merging {type(module).__name__} at {name} (DoRA or a non-Linear "
                                      "LoRA layer) is not supported; target Linear layers with plain LoRA")
        a = merged.pop(f"{name}.lora_A.{adapter}.weight")  # (r, in)
        b = merged.pop(f"{name}.lora_B.{adapter}.weight")  # (out, r)
        delta = (b.float() @ a.float()) * module.scaling[adapter]
        if module.fan_in_fan_out:
            delta = delta.T
        key = f"{name}.base_layer.weight"
        merged[key] = (merged[key].float() + delta).to(merged[key].dtype)
    prefix = "base_model.model."
    out = {}
    for key, value in merged.items():
        if ".lora_" in key:
            raise NotImplementedError(f"save_hf: LoRA weight {key} of another adapter or kind; cannot merge it")
        key = key[len(prefix):] if key.startswith(prefix) else key
        out[key.replace(".base_layer.", ".")] = value
    return out
