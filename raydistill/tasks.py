"""Per-task answer extraction and metrics.

- math: final-answer accuracy — the last number in the answer equals the reference number
  (rows whose reference holds no number are skipped).
- nli: label accuracy — the first of entailment / neutral / contradiction named in the answer
  (rows whose reference names no label are skipped).
- qa, summarization, conversation: ROUGE-L F1 (rouge-score with a Unicode word tokenizer,
  stemmed; 0–1) and corpus BLEU (sacrebleu, 13a tokenizer, 0–100) against the reference.
- agreement: mean ROUGE-L F1 between a model's answer and the teacher's answer (0–1).
"""

from __future__ import annotations

import re
from functools import lru_cache

NLI_LABELS = ("entailment", "neutral", "contradiction")
# Thousands separators only in groups of three ("1,234"); "1,2,3" is a list of three numbers.
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")
_NLI = re.compile(r"\b(entail(?:ment|s|ed)?|neutral|contradict(?:ion|s|ory|ed)?)\b", re.IGNORECASE)

#: Primary metric per task (used for the "quality" summary and charts).
PRIMARY = {"math": "accuracy", "nli": "accuracy", "qa": "rougeL", "summarization": "rougeL",
           "conversation": "rougeL"}


def extract_number(text: str) -> float | None:
    """The last number in ``text`` (commas as thousands separators), or None."""
    found = _NUMBER.findall(text or "")
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def extract_nli_label(text: str) -> str | None:
    """The first NLI label named in ``text`` (entails → entailment, contradicts → contradiction)."""
    m = _NLI.search(text or "")
    if not m:
        return None
    word = m.group(1).lower()
    if word.startswith("entail"):
        return "entailment"
    if word.startswith("contradict"):
        return "contradiction"
    return "neutral"


# Words of any script; CJK ideographs and kana count one character each (they are written
# without spaces). rouge-score's default tokenizer keeps only a-z and 0-9, scoring Japanese or
# Russian answers 0 even against themselves.
_TOKEN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W_]+")


class _UnicodeTokenizer:
    """rouge-score tokenizer: lowercase, Unicode words, Porter stemming of ASCII words > 3 chars
    (as rouge-score's own tokenizer with use_stemmer=True)."""

    def __init__(self):
        from nltk.stem import porter

        self._stemmer = porter.PorterStemmer()

    def tokenize(self, text: str) -> list[str]:
        tokens = _TOKEN.findall((text or "").lower())
        return [self._stemmer.stem(t) if len(t) > 3 and t.isascii() else t for t in tokens]


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_UnicodeTokenizer())


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F1 over pairs (0–1); 0.0 for empty input."""
    if not predictions:
        return 0.0
    scorer = _rouge()
    return sum(scorer.score(r or "", p or "")["rougeL"].fmeasure
               for p, r in zip(predictions, references, strict=True)) / len(predictions)


def bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU (sacrebleu, 0–100) of predictions against one reference each."""
    import sacrebleu

    if not predictions:
        return 0.0
    return float(sacrebleu.corpus_bleu(predictions, [references]).score)


def score(task: str, predictions: list[str], references: list[str | None]) -> dict[str, float]:
    """Task metrics for one model on one task (rows without a reference are skipped)."""
    pairs = [(p, r) for p, r in zip(predictions, references, strict=True) if r is not None]
    if not pairs:
        return {}
    preds, refs = [p for p, _ in pairs], [r for _, r in pairs]
    if task in ("math", "nli"):
        # Only references that carry a gold answer count (a number; an NLI label).
        extract = extract_number if task == "math" else extract_nli_label
        gold = [(extract(r), p) for p, r in pairs if extract(r) is not None]
        if not gold:
            return {}
        if task == "math":
            hits = sum((got := extract_number(p)) is not None and abs(want - got) < 1e-6 for want, p in gold)
        else:
            hits = sum(extract_nli_label(p) == want for want, p in gold)
        return {"accuracy": hits / len(gold)}
    return {"rougeL": rouge_l(preds, refs), "bleu": bleu(preds, refs)}
