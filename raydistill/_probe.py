"""Peak-memory probe, run in a fresh process: ``python -m raydistill._probe MODEL_DIR < PROMPTS_JSON``.

Loads the model with transformers, answers one batch of chat prompts read from stdin as a JSON
list of message lists (32 new tokens, greedy),
and prints one JSON line: ``peak_memory_mb`` (peak resident set size of this process in MB =
10^6 bytes, ``VmHWM`` in /proc/self/status, or peak CUDA memory allocated on a GPU machine) and
``params`` (parameter count). A fresh process keeps other models' memory out of the figure.
(``getrusage``'s ru_maxrss is not used: Linux carries it across fork + exec, so a child of a
large parent reports the parent's peak.)
"""

from __future__ import annotations

import json
import sys


def _peak_rss_bytes() -> int:
    """Peak resident set size of this process since exec (VmHWM), in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource  # not Linux: best effort

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = sys.argv[1]
    messages = json.load(sys.stdin)
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if gpu else torch.float32)
    model = model.to(device).eval()
    texts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]
    enc = tok(texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt").to(device)
    with torch.inference_mode():
        model.generate(**enc, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
    if gpu:
        peak = torch.cuda.max_memory_allocated() / 1e6
    else:
        peak = _peak_rss_bytes() / 1e6
    print(json.dumps({"peak_memory_mb": round(peak, 1), "params": sum(p.numel() for p in model.parameters())}))


if __name__ == "__main__":
    main()
