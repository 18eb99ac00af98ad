"""Text metrics: ROUGE-L F1 and corpus BLEU, with the tokenizers that make them fair across
scripts. Which tasks they score is ``scoring``'s.

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
"""

from __future__ import annotations

import importlib.util
import unicodedata
from functools import lru_cache

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
