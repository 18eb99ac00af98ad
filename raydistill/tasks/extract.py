"""Reading answers: the number a math answer states, the label an NLI answer names, the final
answer text of a qa answer. Scoring them is ``scoring``'s; text metrics are ``text_metrics``'.

math — final-answer accuracy: the number the answer states equals the reference's number (within
1e-6; 1/3 and 0.333 differ). Two figures: ``accuracy`` (strict, the primary metric, the one
``retained`` uses) counts only an answer that states its final answer (below) or is nothing but one
number (``"14"``, ``"$1,250."``); ``accuracy_lenient`` also takes the last number of an answer that
states none, so a degenerate ``2 4 6 8 10 12 14`` is a lenient hit for 14 and a strict miss. The
reference is always read leniently. Numbers are read by these rules (``extract_number``):

- A stated final answer wins over every other number: ``#### N`` (GSM8K; also the configured
  ``task_prompts.final_answer_marker``, the ``marker`` argument, when it is not ``####``), ``\\boxed{...}``,
  "the answer is ...", "final answer: ...", "answer: ..." (also "was", "would be", "=", bold
  ``**Answer:**``). The last such statement that holds a number counts, and its first number is
  the answer: for ``\\boxed`` the box's content, else up to the end of the statement's sentence or
  line (the next non-empty line when the line ends at the marker: "Final answer:\\n42"). With no
  stated answer holding a number ("the answer is seven"), the last number in the text counts
  (lenient reading only; the strict one then has no answer unless the text is one number alone).
- Numbers: integers, decimals (``0.75``, ``.5``), thousands separators in groups of three
  (``1,250``, LaTeX ``1{,}250`` / ``1\\,250``; ``1,2,3`` is three numbers), fractions ``3/4`` and
  ``-1/2`` (not dates: ``3/4/2023`` is three numbers), mixed numbers ``1 1/2`` (proper fraction
  after one run of spaces) and ``2\\frac{1}{2}``, LaTeX ``\\frac{a}{b}``, ``\\dfrac``, ``\\tfrac``,
  ``\\frac12``, and Unicode fractions (``½``, ``1¾``). Each reads as its value: ``0.75`` equals
  ``3/4``. A fraction over zero (``1/0``) is no number.
- A minus sign counts only where it is a sign: at the start, or after a space, ``( [ { = : ; ,``,
  ``$``, quotes or markdown ``* _``; ``5-7`` is a range (reads 7, the last number) and ``x-3`` reads 3.
  The Unicode minus ``−`` counts as ``-``.
- Units are not part of the value: ``$1,250`` reads 1250 and ``25%`` reads 25 (so ``25%`` matches a
  reference ``25``, as GSM8K writes percentages, and does not match ``0.25``).

nli — label accuracy. Labels: three-way ``entailment`` / ``neutral`` / ``contradiction`` and
binary ``entailment`` / ``not_entailment`` (RTE, QNLI; also written "not entailment",
"non-entailment"). Answer and reference are read by the same rules (``extract_nli_label``):

- Word forms count (entails, entailed, contradicts, contradictory, ...).
- A negated label is not that label: "not X", "no X", "isn't X", "doesn't entail", "neither X nor
  Y", "Y rather than X", "instead of X" (negation reaches back three words within a clause).
  A negated entailment reads as ``not_entailment``; a negated neutral or contradiction is ignored.
- An option list (two or more different labels joined only by commas, slashes, "or", "and") is
  the question repeated, not an answer, and is ignored.
- The answer settles on the first label after the last "answer:" / "the answer is" / "label:"
  marker that has one, else on the last label named; ``not_entailment`` gives way to a neutral or
  contradiction named in the same answer (it is implied by either).
- Scoring: a three-way reference needs the same label; a ``not_entailment`` reference is matched by
  ``not_entailment``, ``neutral`` or ``contradiction``.
- Integer labels (``0``, ``2``) are read only through ``data.label_map`` (e.g. ``{"0": "entailment",
  "1": "neutral", "2": "contradiction"}``), applied to the stripped reference text before reading
  it; references not in the map are read as they are. A map value that names no label is an error.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterator
from functools import lru_cache

NLI_LABELS = ("entailment", "neutral", "contradiction")
#: Binary label sets (RTE, QNLI) use ``entailment`` and this label.
NOT_ENTAILMENT = "not_entailment"


# --- math ----------------------------------------------------------------------------------------

# A minus sign is a sign only at the start or after one of these characters (never after a digit
# or letter: "5-7" is a range, "x-3" a difference).
_SIGN = r"(?:(?<![^\s(\[{=:;,$*_\"'~≈<>])(?P<sign>[-\u2212]))?"
_INT = r"\d{1,3}(?:,\d{3})+|\d+"
_DEC = rf"(?:{_INT})(?:\.\d+)?|(?<![\w.])\.\d+"
_SDEC = rf"[-\u2212]?(?:{_DEC})"
_NUMBER = re.compile(
    rf"""{_SIGN}(?:\\?\$)?(?:
        (?P<lwhole>\d+)?\\[dt]?frac\s*(?:
            \{{\s*(?P<lnum>{_SDEC})\s*\}}\s*\{{\s*(?P<lden>{_SDEC})\s*\}}
            |(?P<lnum1>\d)(?P<lden1>\d))
      | (?<![\d./])(?P<mwhole>\d+)[ \t]+(?P<mnum>\d+)/(?P<mden>\d+)(?![\d/]|\.\d)
      | (?<![\d./])(?P<fnum>{_DEC})/(?P<fden>{_DEC})(?![\d/]|\.\d)
      | (?<![\d.])(?P<plain>{_DEC})
    )""",
    re.VERBOSE,
)
# Statements of the final answer; the number that follows one wins over the others.
_ANSWER_MARK = re.compile(
    r"(?P<hash>\#\#\#\#)|(?P<box>\\(?:boxed|fbox)\s*\{)"
    r"|\banswer\b[*_\s]*(?:is|was|would\s+be|will\s+be|should\s+be|equals|[:=])",
    re.IGNORECASE,
)
_LATEX_THOUSANDS = re.compile(r"(?<=\d)(?:\{,\}|\\,)(?=\d{3}(?!\d))")
_VULGAR = re.compile(r"(\d*)([\u00bc-\u00be\u2150-\u215e])")


def _num(text: str) -> float:
    return float(text.replace(",", "").replace("\u2212", "-"))


def normalise_math(text: str) -> str:
    text = _LATEX_THOUSANDS.sub(",", text).replace("\u2044", "/")
    return _VULGAR.sub(lambda m: repr(int(m.group(1) or 0) + unicodedata.numeric(m.group(2))), text)


def _numbers(text: str) -> Iterator[float]:
    """The values of the numbers in ``text``, in order (see the module docstring for the forms)."""
    for m in _NUMBER.finditer(text):
        sign = -1.0 if m.group("sign") else 1.0
        if m.group("plain") is not None:
            yield sign * _num(m.group("plain"))
        elif m.group("mwhole") is not None:
            whole, num, den = int(m.group("mwhole")), int(m.group("mnum")), int(m.group("mden"))
            if 0 < num < den:
                yield sign * (whole + num / den)
            else:  # "2 5/4" or "3 1/0" is not a mixed number: two numbers
                yield sign * whole
                if den:
                    yield num / den
        else:
            if m.group("fnum") is not None:
                whole, num, den = 0.0, _num(m.group("fnum")), _num(m.group("fden"))
            else:
                whole = float(m.group("lwhole") or 0)
                num = _num(m.group("lnum") if m.group("lnum") is not None else m.group("lnum1"))
                den = _num(m.group("lden") if m.group("lden") is not None else m.group("lden1"))
            if den == 0:  # not a value; "1/0" is skipped
                continue
            yield sign * (whole + abs(num / den) if whole else num / den)


def _braced(text: str, start: int) -> str:
    """Text from ``start`` up to the brace that closes the one just before ``start``."""
    depth = 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
    return text[start:]


_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n")


def _stated(text: str, start: int) -> str:
    """The statement from ``start`` to the end of its sentence or line (the next non-empty line
    when the rest of the line is blank: "Final answer:\\n42")."""
    rest = text[start:]
    if not rest.split("\n", 1)[0].strip():
        rest = rest.lstrip()
    return rest[:m.start()] if (m := _SENTENCE_END.search(rest)) else rest


@lru_cache(maxsize=16)
def _answer_marks(marker: str) -> re.Pattern:
    """``_ANSWER_MARK`` plus the configured final-answer marker (when it is not ``####``)."""
    if marker == "####":
        return _ANSWER_MARK
    return re.compile(rf"(?:{re.escape(marker)})|{_ANSWER_MARK.pattern}", re.IGNORECASE)


def stated_number(text: str, marker: str) -> float | None:
    """The first number of the last stated final answer that holds one (``text`` normalised)."""
    for mark in reversed(list(_answer_marks(marker).finditer(text))):
        region = (_braced(text, mark.end()) if mark.group("box") is not None
                  else _stated(text, mark.end()))
        first = next(_numbers(region), None)
        if first is not None:
            return first
    return None


_LETTER = re.compile(r"[^\W\d_]")


def extract_number(text: str | None, marker: str = "####", *, strict: bool = False) -> float | None:
    """The answer's number, or None when ``text`` holds none.

    A stated final answer (``#### N``, the configured ``marker``, ``\\boxed{}``, "the answer is",
    "final answer:") wins: the first number of the last statement that holds one. Otherwise the
    last number in the text, or with ``strict`` only a text that is one number and no letters
    (``"14"``, ``"$1,250."``; ``"2 4 6 8 10 12 14"`` and ``"It is 4."`` read None). Fractions, mixed
    numbers and ``\\frac{a}{b}`` read as their value; a minus sign counts only where it is a sign
    (``5-7`` reads 7); ``$`` and ``%`` are ignored (``25%`` reads 25.0).
    """
    text = normalise_math(text or "")
    stated = stated_number(text, marker)
    if stated is not None:
        return stated
    if strict:
        values = list(_numbers(text))
        alone = len(values) == 1 and not _LETTER.search(_NUMBER.sub("", text))
        return values[0] if alone else None
    last = None
    for last in _numbers(text):
        pass
    return last


def same_number(want: float, got: float | None) -> bool:
    return got is not None and math.isclose(want, got, rel_tol=1e-9, abs_tol=1e-6)


# --- nli -----------------------------------------------------------------------------------------

_NLI = re.compile(
    r"\b(?:(?P<joined>(?:not|non)[_-]?entail\w*)|(?P<ent>entail(?:ment|s|ed|ing)?)|(?P<neu>neutral)"
    r"|(?P<con>contradict(?:ion|s|ory|ed|ing)?))\b",
    re.IGNORECASE,
)
# Separators inside an option list: "entailment, neutral, or contradiction", "entailment / neutral".
_OPTION_SEP = re.compile(r"[\s,/|()\[\]\"'`*]*(?:\b(?:or|and)\b[\s,/|()\[\]\"'`*]*)?", re.IGNORECASE)
# A clause ends at punctuation or a conjunction that starts a new statement.
_CLAUSE_END = re.compile(r"[.;:!?,\n\u2014\u2013]|\b(?:but|however|though|although|so|thus|therefore|"
                         r"hence|because|since|while|whereas|yet)\b", re.IGNORECASE)
_WORD = re.compile(r"[\w'\u2019]+")
_NEGATORS = {"not", "no", "never", "neither", "nor", "non", "without", "cannot", "lacks", "lack"}
_NEG_PAIRS = {("rather", "than"), ("instead", "of"), ("other", "than")}
_FILLER = {"a", "an", "the", "or", "and", "really", "quite", "necessarily", "exactly", "strictly",
           "clearly", "any", "at", "all"}
_NLI_MARK = re.compile(r"\b(?:answer|label|prediction|verdict|classification|relationship|relation)\b"
                       r"[*_\s]*(?:is|was|would\s+be|will\s+be|should\s+be|[:=])", re.IGNORECASE)


def _negated(text: str, start: int) -> bool:
    """Whether a negation reaches the label that starts at ``start`` (same clause, 3 words back)."""
    before = text[:start]
    ends = list(_CLAUSE_END.finditer(before))
    clause = before[ends[-1].end():] if ends else before
    words = [w.lower().replace("\u2019", "'") for w in _WORD.findall(clause)]
    counted = 0
    for i in range(len(words) - 1, -1, -1):
        w = words[i]
        if w in _NEGATORS or w.endswith("n't") or (i > 0 and (words[i - 1], w) in _NEG_PAIRS):
            return True
        if w in _FILLER or _NLI.fullmatch(w):
            continue
        counted += 1
        if counted >= 3:
            return False
    return False


def _label_mentions(text: str) -> list[tuple[int, str]]:
    """(position, label) of every label the text asserts: option lists dropped, negation applied."""
    found = []
    for m in _NLI.finditer(text):
        label = ("not_entailment" if m.group("joined") else "entailment" if m.group("ent")
                 else "neutral" if m.group("neu") else "contradiction")
        found.append((m.start(), m.end(), label))
    # Runs of labels joined only by separators; a run of two or more labels is an option list.
    keep = [True] * len(found)
    i = 0
    while i < len(found):
        j = i
        while j + 1 < len(found) and _OPTION_SEP.fullmatch(text, found[j][1], found[j + 1][0]):
            j += 1
        if len({label for _, _, label in found[i:j + 1]}) > 1:
            keep[i:j + 1] = [False] * (j + 1 - i)
        i = j + 1
    out = []
    for (start, _, label), kept in zip(found, keep):
        if not kept:
            continue
        if _negated(text, start):
            if label != "entailment":
                continue  # "not neutral" does not say which label it is
            label = NOT_ENTAILMENT
        out.append((start, label))
    return out


def extract_nli_label(text: str | None) -> str | None:
    """The NLI label ``text`` settles on: ``entailment``, ``neutral``, ``contradiction``,
    ``not_entailment``, or None when it names none (or only negated ones, or only an option list).

    The first label after the last answer marker ("answer:", "the answer is", "label:") that has
    one, else the last label named; ``not_entailment`` gives way to neutral or contradiction.
    """
    text = text or ""
    mentions = _label_mentions(text)
    if not mentions:
        return None
    for mark in reversed(list(_NLI_MARK.finditer(text))):
        after = [label for pos, label in mentions if pos >= mark.end()]
        if after:
            specific = [label for label in after if label != NOT_ENTAILMENT]
            return specific[0] if specific and after[0] == NOT_ENTAILMENT else after[0]
    labels = [label for _, label in mentions]
    specific = [label for label in labels if label != NOT_ENTAILMENT]
    return specific[-1] if specific else labels[-1]


def nli_hit(want: str, got: str | None) -> bool:
    if want == NOT_ENTAILMENT:
        return got in (NOT_ENTAILMENT, "neutral", "contradiction")
    return got == want


def nli_reference(ref: str, label_map: dict[str, str] | None) -> str | None:
    if label_map:
        ref = label_map.get(str(ref).strip(), ref)
    return extract_nli_label(ref)


def check_label_map(label_map: dict[str, str]) -> None:
    """Raise ValueError naming the key when a ``data.label_map`` value names no NLI label."""
    for key, value in label_map.items():
        if extract_nli_label(str(value)) is None:
            raise ValueError(f"data.label_map[{key!r}] = {value!r} names no NLI label; use one of "
                             f"{', '.join(NLI_LABELS)}, {NOT_ENTAILMENT}")


# --- qa ----------------------------------------------------------------------------------------------

def marked_text(text: str, marker: str) -> str | None:
    """The text after the last ``marker`` that has some: the rest of its line, or the next non-empty
    line when the line ends at the marker (``"####\\nParis"``); markdown emphasis and spaces stripped."""
    for m in reversed(list(re.finditer(re.escape(marker), text, re.IGNORECASE))):
        rest = text[m.end():]
        line, _, after = rest.partition("\n")
        if not line.strip():
            line = next((ln for ln in after.split("\n") if ln.strip()), "")
        answer = line.strip().strip("*_").strip()
        if answer:
            return answer
    return None


def qa_text(text: str | None, marker: str) -> str:
    """What qa scores: the final answer after ``marker`` when the text has one, else the whole text."""
    text = text or ""
    return marked_text(text, marker) or text
