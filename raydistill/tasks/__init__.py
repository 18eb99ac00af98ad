"""Per-task answer extraction and metrics.

``score(task, predictions, references, label_map=None, marker="####")`` returns ``(metrics, unscorable)``:
``metrics`` is ``{"accuracy": x, "accuracy_lenient": y}`` (0–1) for math, ``{"accuracy": x}`` for nli —
an empty dict when no reference can be scored — and ``{"rougeL": x (0–1), "bleu": y (0–100)}`` for qa,
summarization and conversation.
Rows whose reference is None are skipped and not counted anywhere. ``unscorable`` counts the other
references that cannot be read (math: no number; nli: no label, after ``data.label_map``): they are
left out of the accuracy (never scored as a hit or a miss) and the count goes into the report.
Text tasks have no unscorable references.
Modules: ``extract`` reads answers (the number a math answer states, the NLI label, qa's final
answer text), ``text_metrics`` scores text (ROUGE-L, BLEU and their tokenizers), ``scoring`` gives
each task's metrics (``score``, ``PRIMARY``), ``final`` checks final answers against references
for generate's filters. Each module's docstring gives its rules.

agreement (evaluate): mean ROUGE-L F1 between a model's answer and the teacher's answer (0–1).
"""

from __future__ import annotations

from .extract import NLI_LABELS, NOT_ENTAILMENT, check_label_map, extract_nli_label, extract_number
from .final import FINAL_ANSWER_TASKS, agrees_with_reference, final_answer
from .scoring import PRIMARY, score
from .text_metrics import bleu, bleu_tokenizer, rouge_l, rouge_tokens

__all__ = ["FINAL_ANSWER_TASKS", "NLI_LABELS", "NOT_ENTAILMENT", "PRIMARY", "agrees_with_reference", "bleu",
           "bleu_tokenizer", "check_label_map", "extract_nli_label", "extract_number", "final_answer", "rouge_l",
           "rouge_tokens", "score"]
