"""Each task's metrics over one model's answers (``score``), and the primary metric per task.

The rules for reading answers are ``extract``'s; the text metrics ``text_metrics``'.
"""

from __future__ import annotations

from .extract import check_label_map, extract_nli_label, extract_number, nli_hit, nli_reference, qa_text, same_number
from .text_metrics import bleu, rouge_l

#: Primary metric per task (used for the "quality" summary and charts).
PRIMARY = {"math": "accuracy", "nli": "accuracy", "qa": "rougeL", "summarization": "rougeL",
           "conversation": "rougeL"}


def score(task: str, predictions: list[str], references: list[str | None],
          label_map: dict[str, str] | None = None, marker: str = "####") -> tuple[dict[str, float], int]:
    """Task metrics for one model on one task, and the number of unscorable references.

    Returns ``(metrics, unscorable)``: math ``{"accuracy": 0–1, "accuracy_lenient": 0–1}`` (strict:
    only a stated final answer or a lone number counts; lenient: else the last number), nli
    ``{"accuracy": 0–1}`` ({} when no reference can be scored), other tasks ``{"rougeL": 0–1, "bleu": 0–100}`` ({} when every reference is None).
    Rows whose reference is None are skipped and not counted; ``unscorable`` counts the other
    references with no number (math) or no NLI label (nli, after ``label_map``), which are left
    out of the accuracy. ``label_map`` (``data.label_map``) maps NLI reference text, e.g.
    ``{"0": "entailment"}``; a value that names no label raises ValueError. ``marker``
    (``task_prompts.final_answer_marker``) precedes the final answer: math reads the number after it
    (as after ``####``), qa scores the text after it (answer and reference) when there is one.
    """
    pairs = [(p, r) for p, r in zip(predictions, references, strict=True) if r is not None]
    if task == "math":
        gold = [(want, p) for p, r in pairs if (want := extract_number(r, marker)) is not None]
        unscorable = len(pairs) - len(gold)
        if not gold:
            return {}, unscorable
        strict = sum(same_number(want, extract_number(p, marker, strict=True)) for want, p in gold)
        lenient = sum(same_number(want, extract_number(p, marker)) for want, p in gold)
        return {"accuracy": strict / len(gold), "accuracy_lenient": lenient / len(gold)}, unscorable
    if task == "nli":
        if label_map:
            check_label_map(label_map)
        gold = [(want, p) for p, r in pairs if (want := nli_reference(r, label_map)) is not None]
        unscorable = len(pairs) - len(gold)
        if not gold:
            return {}, unscorable
        hits = sum(nli_hit(want, extract_nli_label(p)) for want, p in gold)
        return {"accuracy": hits / len(gold)}, unscorable
    if not pairs:
        return {}, 0
    if task == "qa":
        pairs = [(qa_text(p, marker), qa_text(r, marker)) for p, r in pairs]
    preds, refs = [p for p, _ in pairs], [r for _, r in pairs]
    return {"rougeL": rouge_l(preds, refs), "bleu": bleu(preds, refs)}, 0
