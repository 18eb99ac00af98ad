"""Which teacher layers a pruned student keeps, by measured importance (``student.prune.method: importance``).

Block Influence (ShortGPT: Men et al. 2024, "ShortGPT: Layers in Large Language Models are More
Redundant Than You Expect", arXiv 2403.03853, eq. 2). For decoder block ``i`` with input hidden
states ``X_i`` and output ``X_{i+1}`` (one vector per token)::

    BI_i = 1 - mean over tokens t of  (X_{i,t} . X_{i+1,t}) / (|X_{i,t}| |X_{i+1,t}|)

A block that hardly turns its input (BI near 0) does little and is removed first; ShortGPT removes
the blocks of lowest BI, and Minitron (Muralidharan et al. 2024, "Compact Language Models via
Pruning and Knowledge Distillation", arXiv 2407.14679, section 2.2) ranks depth the same way before
distilling. The tokens are those of a calibration sample of the corpus's train rows (prompt and
teacher answer, as the student will be trained on them), chosen by ``corpus.order_keys`` with the
data seed: the same rows on every run, whatever the corpus's files.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence

CALIBRATION_COLUMNS = ["prompt_id", "split", "messages", "response", "error"]


def block_influence(model, batches: Iterable[dict]) -> list[float]:
    """The Block Influence of every decoder block of ``model`` (an HF causal LM of a layout
    ``models.decoder_layers`` knows), averaged over the non-padding tokens of ``batches``.

    ``batches``: dicts with ``input_ids`` and ``attention_mask``, LongTensors of shape (batch, seq)
    (right padding). Returns one float per block, in [0, 2] (0: the block's output points where its
    input did; a zero vector counts as cosine 0, ``torch.nn.functional.cosine_similarity``'s eps). Runs under ``torch.no_grad`` on the model's device; raises ValueError when the
    batches hold no token."""
    import torch

    from .models import decoder_layers

    layers = decoder_layers(model)
    inputs: dict[int, torch.Tensor] = {}
    sums = [0.0] * len(layers)
    mask: torch.Tensor | None = None

    def before(i):
        def hook(module, args, kwargs):
            inputs[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def after(i):
        def hook(module, args, kwargs, output):
            out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(inputs.pop(i).float(), out.float(), dim=-1)  # (batch, seq)
            sums[i] += float(cos[mask > 0].sum())  # padding positions left out
        return hook

    handles = [h for i, layer in enumerate(layers)
               for h in (layer.register_forward_pre_hook(before(i), with_kwargs=True),
                         layer.register_forward_hook(after(i), with_kwargs=True))]
    tokens = 0
    device = next(model.parameters()).device
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                mask = batch["attention_mask"].to(device).float()
                tokens += int(mask.sum())
                model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                      use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if tokens == 0:
        raise ValueError("block influence: the calibration batches hold no token")
    return [1.0 - s / tokens for s in sums]


def most_influential(scores: Sequence[float], k: int) -> list[int]:
    """The indices of the ``k`` blocks of highest Block Influence, in model order (ties: the lower
    index). Raises ValueError unless 1 <= k <= len(scores)."""
    if not 1 <= k <= len(scores):
        raise ValueError(f"cannot keep {k} of {len(scores)} layers")
    return sorted(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k])


def calibration_rows(files: Sequence[str], filesystem, n: int, seed: int) -> list[dict]:
    """``n`` answered train rows of the corpus (``messages``, ``response``, ``prompt_id``): those whose
    ``corpus.order_keys(prompt_id, seed)`` are smallest, so the sample is spread over the corpus and
    the same on every run. Streams the files' ``CALIBRATION_COLUMNS`` in record batches and holds at
    most ``n`` rows. Fewer when the corpus has fewer."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from .corpus import order_keys

    heap: list[tuple[int, str, dict]] = []  # max-heap by key (negated): the n smallest keys seen
    for path in files:
        with filesystem.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(columns=CALIBRATION_COLUMNS, batch_size=1024):
                keep = pc.and_(pc.equal(batch.column("split"), "train"), pc.is_null(batch.column("error")))
                rows = batch.filter(keep).to_pylist()
                for row, key in zip(rows, order_keys([r["prompt_id"] for r in rows], seed).to_pylist()):
                    item = (-key, row["prompt_id"], {k: row[k] for k in ("prompt_id", "messages", "response")})
                    if len(heap) < n:
                        heapq.heappush(heap, item)
                    elif item > heap[0]:
                        heapq.heapreplace(heap, item)
    return [row for _, _, row in sorted(heap, reverse=True)]


def calibration_batches(tokenizer, rows: Sequence[dict], max_tokens: int, batch_size: int = 8) -> list[dict]:
    """The rows as the student is trained on them: the chat template's prompt ids
    (``chat.prompt_ids``) then the answer's ids, cut to ``max_tokens``; right-padded batches of
    ``batch_size`` (``input_ids``, ``attention_mask``: LongTensors (batch, longest))."""
    import torch

    from .chat import prompt_ids, text_ids

    seqs = [(prompt_ids(tokenizer, r["messages"]) + text_ids(tokenizer, r["response"] or ""))[:max_tokens]
            for r in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for start in range(0, len(seqs), batch_size):
        part = seqs[start:start + batch_size]
        width = max(len(s) for s in part)
        out.append({"input_ids": torch.tensor([s + [pad] * (width - len(s)) for s in part]),
                    "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in part])})
    return out
