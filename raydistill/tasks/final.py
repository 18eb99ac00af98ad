"""Final answers and the reference check (generate's filters, ``raydistill.generate.filters``), by the
same rules as the scorers:

- ``final_answer(task, text, marker)``: math — the number of the last stated final answer (the
  marker, ``\\boxed``, "the answer is", ...; a bare last number is no final answer), as text
  (``"72"``, ``"0.75"``); qa — the text after the last marker, else None; nli — the label
  ``extract_nli_label`` reads; summarization and conversation — None (no final answer to check).
- ``agrees_with_reference(task, answer, reference, marker)``: math — the numbers are equal (as
  ``score``); nli — the label scores a hit; qa — the reference's words (``rouge_tokens`` of its final
  answer, or of the whole reference) appear together and in order in the answer's final answer (or
  whole answer without one); None when the reference is missing or unreadable, or the task has no
  checkable answer.
"""

from __future__ import annotations

from .extract import (
    extract_nli_label,
    extract_number,
    marked_text,
    nli_hit,
    nli_reference,
    normalise_math,
    qa_text,
    same_number,
    stated_number,
)
from .text_metrics import rouge_tokens

#: Tasks whose answers carry a final answer that ``final_answer`` reads.
FINAL_ANSWER_TASKS = ("math", "qa", "nli")


def _number_text(value: float) -> str:
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def final_answer(task: str, text: str | None, marker: str = "####") -> str | None:
    """The final answer ``text`` states, or None when it states none.

    math: the number of the last stated final answer (after ``marker``, ``####``, ``\\boxed{}``,
    "the answer is", "final answer:"; ``extract_number``'s rules) as text (``"72"``, ``"-0.5"``); a
    number that is merely the last in the text is no final answer. qa: the text after the last
    ``marker`` on its line (or alone on the next non-empty line), emphasis stripped. nli: the label
    ``extract_nli_label`` reads (``entailment``, ``neutral``, ``contradiction``, ``not_entailment``).
    summarization, conversation: always None (their answers have no final answer).
    Raises ValueError for an unknown task.
    """
    text = text or ""
    if task == "math":
        value = stated_number(normalise_math(text), marker)
        return None if value is None else _number_text(value)
    if task == "qa":
        return marked_text(text, marker)
    if task == "nli":
        return extract_nli_label(text)
    if task in ("summarization", "conversation"):
        return None
    raise ValueError(f"unknown task {task!r}; expected one of math, nli, qa, summarization, conversation")


def agrees_with_reference(task: str, answer_text: str | None, reference: str | None, marker: str = "####",
                          *, label_map: dict[str, str] | None = None) -> bool | None:
    """Whether the answer's final answer agrees with the reference, by the scorers' rules.

    math: ``extract_number`` of both equal (within 1e-6), as ``score`` counts a hit. nli: the
    answer's label is a hit for the reference's label (``label_map`` applied to the reference, a
    ``not_entailment`` reference matched by neutral or contradiction too). qa: the reference's words
    (``rouge_tokens`` of its final answer, or of all of it) appear together and in order in the
    answer's final answer (or in the whole answer when it has none): ``Paris`` agrees with ``The
    capital is Paris.``. Returns None (nothing to check) when the reference is None or unreadable
    (no number, no label, no words) and for summarization and conversation.
    """
    if reference is None:
        return None
    if task == "math":
        want = extract_number(reference, marker)
        return None if want is None else same_number(want, extract_number(answer_text, marker))
    if task == "nli":
        want = nli_reference(reference, label_map)
        return None if want is None else nli_hit(want, extract_nli_label(answer_text))
    if task == "qa":
        want = rouge_tokens(qa_text(reference, marker))
        if not want:
            return None
        got = rouge_tokens(qa_text(answer_text, marker))
        return any(got[i:i + len(want)] == want for i in range(len(got) - len(want) + 1))
    if task in ("summarization", "conversation"):
        return None
    raise ValueError(f"unknown task {task!r}; expected one of math, nli, qa, summarization, conversation")
