"""Per-task answer extraction and metrics.

``score(task, predictions, references, label_map=None, marker="####")`` returns ``(metrics, unscorable)``:
``metrics`` is ``{"accuracy": x, "accuracy_lenient": y}`` (0–1) for math, ``{"accuracy": x}`` for nli —
an empty dict when no reference can be scored — and ``{"rougeL": x (0–1), "bleu": y (0–100)}`` for qa,
summarization and conversation.
Rows whose reference is None are skipped and not counted anywhere. ``unscorable`` counts the other
references that cannot be read (math: no number; nli: no label, after ``data.label_map``): they are
left out of the accuracy (never scored as a hit or a miss) and the count goes into the report.
Text tasks have no unscorable references.

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

qa, summarization, conversation — ROUGE-L F1 (rouge-score with the Unicode tokenizer below; 0–1)
and corpus BLEU (sacrebleu, 0–100) against the reference. For qa, a text with a final-answer line
(``#### Paris``: the marker, then the answer on its line, or alone on the next non-empty line) is
scored by that final answer only, answer and reference alike (``final_answer``); a text without one
is scored whole.

- ROUGE-L tokens (``rouge_tokens``): text is NFC-normalised and lowercased; a word is a run of
  letters, digits and combining marks (Unicode Mn/Mc/Me: Thai vowel marks, Devanagari matras and
  virama stay in their word, so ``ดู`` ≠ ``ดี`` and ``दिन`` ≠ ``दान``). Arabic and Hebrew optional
  vowel points (harakat, shadda, niqqud, cantillation) and the Arabic tatweel are dropped, so
  vocalised and plain spellings match (``كَتَبَ`` = ``كتب``). Scripts written without spaces are
  split into character clusters (a letter and its combining marks): Han, kana, Thai, Lao, Khmer,
  Myanmar and the Tai scripts. Emoji and other symbols (Unicode So) are one token each, with their
  modifiers (skin tone, variation selector, keycap) and the parts of a ZWJ sequence or flag joined
  in (``👍🏽`` and ``👨‍👩‍👧`` are one token each); rouge-score's own tokenizer drops every
  non-alphanumeric character, so two identical emoji-only answers scored 0.0. A text with no token
  at all by these rules (only punctuation or math signs) is tokenized into its non-space
  characters. ASCII words longer than three characters are Porter-stemmed, as rouge-score's own
  tokenizer does; other punctuation and signs (``$``, ``+``) separate words.
- BLEU tokenizer (``bleu_tokenizer``), chosen once per call from the references' letters (the
  predictions' only when the references have none), so every model is scored the same way:
  kana present and Han + kana at least half the letters → ``ja-mecab`` when MeCab and ipadic are
  importable, else ``char``; otherwise any Han → ``zh``; otherwise Thai/Lao/Khmer/Myanmar/Tai at
  least half the letters → ``char`` (``flores200`` is not used: its model is downloaded at run
  time); otherwise ``13a``.

agreement (evaluate): mean ROUGE-L F1 between a model's answer and the teacher's answer (0–1).

Final answers and the reference check (generate's filters, ``raydistill.generate.filters``), by the
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

import importlib.util
import math
import re
import unicodedata
from collections.abc import Iterator
from functools import lru_cache

NLI_LABELS = ("entailment", "neutral", "contradiction")
#: Binary label sets (RTE, QNLI) use ``entailment`` and this label.
NOT_ENTAILMENT = "not_entailment"

#: Primary metric per task (used for the "quality" summary and charts).
PRIMARY = {"math": "accuracy", "nli": "accuracy", "qa": "rougeL", "summarization": "rougeL",
           "conversation": "rougeL"}


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


def _normalise_math(text: str) -> str:
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


def _stated_number(text: str, marker: str) -> float | None:
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
    text = _normalise_math(text or "")
    stated = _stated_number(text, marker)
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


def _same_number(want: float, got: float | None) -> bool:
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


def _nli_hit(want: str, got: str | None) -> bool:
    if want == NOT_ENTAILMENT:
        return got in (NOT_ENTAILMENT, "neutral", "contradiction")
    return got == want


def _nli_reference(ref: str, label_map: dict[str, str] | None) -> str | None:
    if label_map:
        ref = label_map.get(str(ref).strip(), ref)
    return extract_nli_label(ref)


def check_label_map(label_map: dict[str, str]) -> None:
    """Raise ValueError naming the key when a ``data.label_map`` value names no NLI label."""
    for key, value in label_map.items():
        if extract_nli_label(str(value)) is None:
            raise ValueError(f"data.label_map[{key!r}] = {value!r} names no NLI label; use one of "
                             f"{', '.join(NLI_LABELS)}, {NOT_ENTAILMENT}")


# --- text: ROUGE-L and BLEU ----------------------------------------------------------------------

# Scripts written without spaces: a letter and its combining marks form one token.
_CLUSTER_RANGES = (
    (0x0E00, 0x0EFF),  # Thai, Lao
    (0x1000, 0x109F),  # Myanmar
    (0x1780, 0x17FF), (0x19E0, 0x19FF),  # Khmer
    (0x1950, 0x19DF), (0x1A20, 0x1AAF), (0xAA80, 0xAADF),  # Tai Le, New Tai Lue, Tai Tham, Tai Viet
    (0xA9E0, 0xA9FF), (0xAA60, 0xAA7F),  # Myanmar extensions
)
_HAN_RANGES = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x3134F))
_KANA_RANGES = ((0x3040, 0x30FF), (0x31F0, 0x31FF), (0xFF66, 0xFF9F))


def _in(ch: str, ranges: tuple[tuple[int, int], ...]) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in ranges)


def _dropped_mark(ch: str) -> bool:
    """Arabic/Hebrew optional vowel points and cantillation, the Arabic tatweel."""
    cp = ord(ch)
    return (0x064B <= cp <= 0x065F or cp in (0x0670, 0x0640) or 0x06D6 <= cp <= 0x06ED
            or (0x0591 <= cp <= 0x05C7 and unicodedata.category(ch) == "Mn"))


_SKIP, _MARK, _CLUSTER, _WORDCHAR, _SEPARATOR, _JOINER = range(6)
_ZWJ = "\u200d"
_REGIONAL = ((0x1F1E6, 0x1F1FF),)  # regional indicators: two make one flag


@lru_cache(maxsize=65536)
def _char_kind(ch: str) -> int:
    cat = unicodedata.category(ch)
    if _dropped_mark(ch):
        return _SKIP
    # Combining marks; emoji skin-tone modifiers (Sk) and tag characters (subdivision flags).
    if cat[0] == "M" or 0x1F3FB <= ord(ch) <= 0x1F3FF or 0xE0020 <= ord(ch) <= 0xE007F:
        return _MARK
    if ch == _ZWJ:
        return _JOINER
    if cat[0] == "L" and (_in(ch, _CLUSTER_RANGES) or _in(ch, _HAN_RANGES) or _in(ch, _KANA_RANGES)):
        return _CLUSTER
    if cat == "So":  # emoji, dingbats and other symbols: one token each
        return _CLUSTER
    return _WORDCHAR if cat[0] in "LN" else _SEPARATOR


def rouge_tokens(text: str | None) -> list[str]:
    """ROUGE-L tokens of ``text`` before stemming (rules in the module docstring).

    A text that would give no token at all (only punctuation or math signs: ``"?!"``) gives its
    non-space characters instead, so two identical such texts still match."""
    text = unicodedata.normalize("NFC", text or "").lower()
    tokens: list[str] = []
    cur: list[str] = []
    cluster = False  # whether ``cur`` is a character cluster (letter + marks, or one emoji)
    joined = False  # whether ``cur`` ends with a zero-width joiner (an emoji ZWJ sequence goes on)
    for ch in text:
        kind = _char_kind(ch)
        if kind == _MARK:
            cur.append(ch)  # belongs to the letter before it (or starts a word)
        elif kind == _JOINER:
            if cur:
                cur.append(ch)
                joined = True
        elif kind == _CLUSTER and cur and (joined or (len(cur) == 1 and _in(ch, _REGIONAL)
                                                      and _in(cur[0], _REGIONAL))):
            cur.append(ch)  # 👨‍👩‍👧 (joined by ZWJ) and a flag 🇫🇷 (two regional indicators) are one token
            joined = False
        elif kind == _CLUSTER or (kind == _WORDCHAR and cluster) or kind == _SEPARATOR:
            if cur:
                tokens.append("".join(cur))
            cur, cluster = ([ch], kind == _CLUSTER) if kind != _SEPARATOR else ([], False)
            joined = False
        elif kind == _WORDCHAR:
            cur.append(ch)
            joined = False
    if cur:
        tokens.append("".join(cur))
    if not tokens:
        tokens = [ch for ch in text if not ch.isspace()]
    return tokens


class _UnicodeTokenizer:
    """rouge-score tokenizer: ``rouge_tokens``, then Porter stemming of ASCII words > 3 chars
    (as rouge-score's own tokenizer with use_stemmer=True)."""

    def __init__(self):
        from nltk.stem import porter

        self._stemmer = porter.PorterStemmer()

    def tokenize(self, text: str) -> list[str]:
        return [self._stemmer.stem(t) if len(t) > 3 and t.isascii() else t for t in rouge_tokens(text)]


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


def _mecab_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("MeCab", "ipadic"))


def bleu_tokenizer(references: list[str | None], predictions: list[str | None] | None = None) -> str:
    """The sacrebleu tokenizer for these texts: ``zh``, ``ja-mecab``, ``char`` or ``13a``.

    Chosen from the references' letters (the predictions' only when the references have none);
    the rule is in the module docstring.
    """
    def counts(texts):
        han = kana = unseg = letters = 0
        for text in texts:
            for ch in text or "":
                if not ch.isalpha():
                    continue
                letters += 1
                han += _in(ch, _HAN_RANGES)
                kana += _in(ch, _KANA_RANGES)
                unseg += _in(ch, _CLUSTER_RANGES)
        return han, kana, unseg, letters

    han, kana, unseg, letters = counts(references)
    if not letters and predictions:
        han, kana, unseg, letters = counts(predictions)
    if kana and 2 * (han + kana) >= letters:
        return "ja-mecab" if _mecab_available() else "char"
    if han:
        return "zh"
    if letters and 2 * unseg >= letters:
        return "char"
    return "13a"


def bleu(predictions: list[str], references: list[str], tokenize: str | None = None) -> float:
    """Corpus BLEU (sacrebleu, 0–100) of predictions against one reference each.

    ``tokenize`` is a sacrebleu tokenizer name; None chooses one by script (``bleu_tokenizer``).
    """
    import sacrebleu

    if not predictions:
        return 0.0
    tokenize = tokenize or bleu_tokenizer(references, predictions)
    preds = [p or "" for p in predictions]
    refs = [r or "" for r in references]
    return float(sacrebleu.corpus_bleu(preds, [refs], tokenize=tokenize).score)


# --- per task ------------------------------------------------------------------------------------

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
        strict = sum(_same_number(want, extract_number(p, marker, strict=True)) for want, p in gold)
        lenient = sum(_same_number(want, extract_number(p, marker)) for want, p in gold)
        return {"accuracy": strict / len(gold), "accuracy_lenient": lenient / len(gold)}, unscorable
    if task == "nli":
        if label_map:
            check_label_map(label_map)
        gold = [(want, p) for p, r in pairs if (want := _nli_reference(r, label_map)) is not None]
        unscorable = len(pairs) - len(gold)
        if not gold:
            return {}, unscorable
        hits = sum(_nli_hit(want, extract_nli_label(p)) for want, p in gold)
        return {"accuracy": hits / len(gold)}, unscorable
    if not pairs:
        return {}, 0
    if task == "qa":
        pairs = [(_qa_text(p, marker), _qa_text(r, marker)) for p, r in pairs]
    preds, refs = [p for p, _ in pairs], [r for _, r in pairs]
    return {"rougeL": rouge_l(preds, refs), "bleu": bleu(preds, refs)}, 0


# --- final answers (generate's filters) ----------------------------------------------------------

#: Tasks whose answers carry a final answer that ``final_answer`` reads.
FINAL_ANSWER_TASKS = ("math", "qa", "nli")


def _marked_text(text: str, marker: str) -> str | None:
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


def _qa_text(text: str | None, marker: str) -> str:
    """What qa scores: the final answer after ``marker`` when the text has one, else the whole text."""
    text = text or ""
    return _marked_text(text, marker) or text


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
        value = _stated_number(_normalise_math(text), marker)
        return None if value is None else _number_text(value)
    if task == "qa":
        return _marked_text(text, marker)
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
        return None if want is None else _same_number(want, extract_number(answer_text, marker))
    if task == "nli":
        want = _nli_reference(reference, label_map)
        return None if want is None else _nli_hit(want, extract_nli_label(answer_text))
    if task == "qa":
        want = rouge_tokens(_qa_text(reference, marker))
        if not want:
            return None
        got = rouge_tokens(_qa_text(answer_text, marker))
        return any(got[i:i + len(want)] == want for i in range(len(got) - len(want) + 1))
    if task in ("summarization", "conversation"):
        return None
    raise ValueError(f"unknown task {task!r}; expected one of math, nli, qa, summarization, conversation")
