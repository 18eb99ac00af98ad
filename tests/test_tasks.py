"""Tests of raydistill.tasks: answer extraction and metrics."""

from __future__ import annotations

import pytest

from raydistill.tasks import bleu, extract_nli_label, extract_number, rouge_l, score


# --- extract_number ----------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("42", 42.0),
    ("The answer is 42.", 42.0),
    ("From 3 apples, add 4 to get 7", 7.0),
    ("Total: 1,234 dollars", 1234.0),
    ("It costs 1,000,000 in all", 1_000_000.0),
    ("The temperature is -5 degrees", -5.0),
    ("We have 12, 15, and -3", -3.0),
    ("Half is 2.5", 2.5),
    ("So 3 then 0.75.", 0.75),
])
def test_extract_number(text, expected):
    assert extract_number(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["no numbers here", "", None, "minus - sign only"])
def test_extract_number_none(text):
    assert extract_number(text) is None


# --- extract_nli_label -------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("entailment", "entailment"),
    ("Entailment.", "entailment"),
    ("The premise entails the hypothesis.", "entailment"),
    ("Yes, it is entailed.", "entailment"),
    ("contradiction", "contradiction"),
    ("The premise CONTRADICTS the hypothesis", "contradiction"),
    ("These statements are contradictory.", "contradiction"),
    ("neutral", "neutral"),
    ("I would say Neutral here", "neutral"),
    # The first label named wins.
    ("entailment, not contradiction", "entailment"),
    ("It contradicts; it is not neutral or entailment", "contradiction"),
    ("neutral rather than entailment", "neutral"),
])
def test_extract_nli_label(text, expected):
    assert extract_nli_label(text) == expected


@pytest.mark.parametrize("text", ["I don't know", "", None, "yes"])
def test_extract_nli_label_none(text):
    assert extract_nli_label(text) is None


# --- score -------------------------------------------------------------------------------------

def test_score_math_accuracy():
    preds = ["The answer is 19.", "I think 26", "no idea", "That makes 1,000 in total", "19.0"]
    refs = ["19", "27", "5", "1000", "19"]
    # hits: 19 == 19, 26 != 27, none, 1000 == 1000, 19.0 == 19 -> 3 of 5
    assert score("math", preds, refs) == {"accuracy": pytest.approx(3 / 5)}


def test_score_skips_references_without_a_gold_answer():
    """A reference with no number (math) or no label (nli) cannot be scored: it is skipped,
    never counted as a hit because both sides fail to parse."""
    assert score("math", ["7"], ["seven"]) == {}
    assert score("math", ["7", "8"], ["seven", "8"]) == {"accuracy": 1.0}
    assert score("nli", ["garbage"], [""]) == {}
    assert score("nli", ["garbage", "neutral"], ["2", "neutral"]) == {"accuracy": 1.0}


def test_rouge_l_scores_non_latin_text():
    assert rouge_l(["東京です"], ["東京です"]) == pytest.approx(1.0)
    assert rouge_l(["Привет, как дела?"], ["Привет, как дела?"]) == pytest.approx(1.0)
    # CJK characters count one token each: LCS of 東京です / 京都です is 京です, 3 of 4 -> P = R = 0.75
    assert rouge_l(["東京です"], ["京都です"]) == pytest.approx(0.75)


def test_score_nli_accuracy():
    preds = ["Entailment.", "It is neutral", "This contradicts it", "no clue"]
    refs = ["entailment", "contradiction", "contradiction", "neutral"]
    # hits: 1, 0, 1, 0 -> 2 of 4
    assert score("nli", preds, refs) == {"accuracy": pytest.approx(0.5)}


@pytest.mark.parametrize("task", ["qa", "summarization", "conversation"])
def test_score_text_ranges(task):
    preds = ["The capital of France is Paris.", "A big dog ran in the park today.", "nothing alike at all"]
    refs = ["Paris is the capital of France.", "The big dog ran to the park.", "completely different words here"]
    s = score(task, preds, refs)
    assert set(s) == {"rougeL", "bleu"}
    assert 0.0 <= s["rougeL"] <= 1.0
    assert 0.0 <= s["bleu"] <= 100.0
    # Partially overlapping answers: strictly between the extremes.
    assert 0.0 < s["rougeL"] < 1.0
    assert s["bleu"] < 100.0


def test_score_identical_text_is_perfect():
    refs = ["The capital of France is Paris and it is big.", "A small cat sat on the old red mat."]
    s = score("qa", list(refs), refs)
    assert s["rougeL"] == pytest.approx(1.0)
    assert s["bleu"] == pytest.approx(100.0)


def test_score_skips_rows_without_reference():
    preds = ["The cat sat on the mat.", "totally unrelated junk", "Paris is nice."]
    refs = ["The cat sat on the mat.", None, "Paris is nice."]
    s = score("qa", preds, refs)
    assert s["rougeL"] == pytest.approx(1.0)
    assert s["bleu"] == pytest.approx(100.0)
    assert score("math", ["5", "x", "6"], ["5", None, "7"]) == {"accuracy": pytest.approx(0.5)}


def test_score_all_references_missing():
    assert score("qa", ["a", "b"], [None, None]) == {}
    assert score("math", [], []) == {}


# --- rouge_l against a hand-computed LCS F1 ----------------------------------------------------

def _lcs(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def _lcs_f1(pred: str, ref: str) -> float:
    p, r = pred.split(), ref.split()
    n = _lcs(p, r)
    if n == 0:
        return 0.0
    precision, recall = n / len(p), n / len(r)
    return 2 * precision * recall / (precision + recall)


# Short lowercase words that a Porter stemmer leaves unchanged.
PAIRS = [
    ("the cat sat on the mat", "the cat is on a mat"),   # LCS 4 of 6/6 -> F1 2/3
    ("a red dog", "the big red dog ran far"),            # LCS 2, P 2/3, R 1/3 -> F1 4/9
    ("one two six", "ten sun box"),                      # LCS 0 -> 0
]


def test_lcs_helper_matches_hand_values():
    assert _lcs_f1(*PAIRS[0]) == pytest.approx(2 / 3)
    assert _lcs_f1(*PAIRS[1]) == pytest.approx(4 / 9)
    assert _lcs_f1(*PAIRS[2]) == 0.0


@pytest.mark.parametrize("pred, ref", PAIRS)
def test_rouge_l_equals_lcs_f1(pred, ref):
    assert rouge_l([pred], [ref]) == pytest.approx(_lcs_f1(pred, ref))


def test_rouge_l_is_mean_over_pairs():
    preds = [p for p, _ in PAIRS]
    refs = [r for _, r in PAIRS]
    assert rouge_l(preds, refs) == pytest.approx((2 / 3 + 4 / 9 + 0.0) / 3)


def test_rouge_l_and_bleu_empty_input():
    assert rouge_l([], []) == 0.0
    assert bleu([], []) == 0.0


def test_bleu_no_overlap_is_zero():
    assert bleu(["one two six"], ["ten sun box"]) == pytest.approx(0.0)


def test_extract_number_comma_list_is_not_one_number():
    from raydistill.tasks import extract_number

    assert extract_number("The numbers 1,2,3") == 3.0
    assert extract_number("It costs 1,234,567 dollars") == 1234567.0
