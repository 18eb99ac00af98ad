"""Memory probe, run in a fresh process:
``python -m raydistill._probe MODEL_DIR [--dtype float32|bfloat16|float16] [--device cpu|cuda] < PROMPTS_JSON``.

Loads the model with transformers in ``--dtype`` (default float32 on CPU, bfloat16 on CUDA: give
the dtype of the engine that produced the latency), answers one batch of chat prompts read from
stdin as a JSON list of message lists (32 new tokens, greedy), and prints one JSON line:

- ``process_baseline_mb``: resident set size (RSS) once torch and transformers are imported and
  the tokenizer is loaded, before the model: the interpreter and libraries, the same for every
  model (about 500 MB on CPU with torch + transformers);
- ``peak_memory_mb``: peak RSS of the process (``VmHWM`` in /proc/self/status) while loading the
  model and generating (the peak is reset to the baseline first, where Linux allows it, so the
  imports' transient peak is not counted); on CUDA the peak host RSS as well;
- ``model_memory_mb``: the model's own memory: weights + activations and KV cache at this batch.
  On CPU ``peak_memory_mb - process_baseline_mb``; on CUDA the peak CUDA memory allocated
  (``torch.cuda.max_memory_allocated``), which holds nothing but the model's tensors;
- ``params``: parameter count; ``dtype``, ``device``: what was measured; ``batch``: prompts in the batch;
  ``max_new_tokens``: 32.

All sizes in MB = 10^6 bytes. A fresh process keeps other models' memory out of the figures.
(``getrusage``'s ru_maxrss is not used: Linux carries it across fork + exec, so a child of a
large parent reports the parent's peak.)
"""

from __future__ import annotations

import argparse
import json
import sys

MAX_NEW_TOKENS = 32


def _status_kb(key: str) -> int | None:
    """A ``kB`` field of /proc/self/status (``VmRSS``, ``VmHWM``), or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _rss_bytes() -> int:
    """Current resident set size of this process (VmRSS), in bytes."""
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    import resource  # not Linux: best effort (the peak so far)

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_rss_bytes() -> int:
    """Peak resident set size of this process since exec (VmHWM), in bytes."""
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb * 1024
    import resource  # not Linux: best effort

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs), so that the
    peak counts from here on, not the transient peak of the imports. False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m raydistill._probe")
    parser.add_argument("model_dir")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    messages = json.load(sys.stdin)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    from raydistill.chat import prompt_ids

    # The prompt ids every stage sends (chat.prompt_ids), left-padded.
    ids = [prompt_ids(tok, m) for m in messages]
    enc = tok.pad({"input_ids": ids}, padding=True, padding_side="left", return_tensors="pt")
    if device == "cuda":
        torch.cuda.init()
    baseline = _rss_bytes()  # interpreter + torch + transformers + tokenizer, no model yet
    _reset_peak()  # the imports' transient peak (above the resting baseline) is not the model's
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=getattr(torch, dtype))
    model = model.to(device).eval()
    with torch.inference_mode():
        model.generate(**enc.to(device), max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                       pad_token_id=tok.pad_token_id)
    peak = _peak_rss_bytes()
    own = torch.cuda.max_memory_allocated() if device == "cuda" else max(0, peak - baseline)
    print(json.dumps({"process_baseline_mb": round(baseline / 1e6, 1), "peak_memory_mb": round(peak / 1e6, 1),
                      "model_memory_mb": round(own / 1e6, 1), "params": sum(p.numel() for p in model.parameters()),
                      "dtype": dtype, "device": device, "batch": len(messages), "max_new_tokens": MAX_NEW_TOKENS}))


if __name__ == "__main__":
    main()
