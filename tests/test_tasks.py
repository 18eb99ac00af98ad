"""Tests of raydistill.tasks: answer extraction and metrics."""

from __future__ import annotations

import pytest

from raydistill.tasks import bleu, bleu_tokenizer, extract_nli_label, extract_number, rouge_l, rouge_tokens, score

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
    # Negated labels do not count.
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
    # lenient hits: 19 == 19, 26 != 27, none, 1000 == 1000, 19.0 == 19 -> 3 of 5; strict: "I think 26"
    # and "That makes 1,000 in total" state no final answer -> 19 and the lone 19.0 -> 2 of 5
    assert score("math", preds, refs) == ({"accuracy": pytest.approx(2 / 5),
                                           "accuracy_lenient": pytest.approx(3 / 5)}, 0)


def test_score_counts_references_without_a_gold_answer():
    """A reference with no number (math) or no label (nli) cannot be scored: it is left out of
    the accuracy (never a hit because both sides fail to parse) and counted as unscorable."""
    assert score("math", ["7"], ["seven"]) == ({}, 1)
    assert score("math", ["7", "8"], ["seven", "8"]) == ({"accuracy": 1.0, "accuracy_lenient": 1.0}, 1)
    assert score("nli", ["garbage"], [""]) == ({}, 1)
    assert score("nli", ["garbage", "neutral"], ["2", "neutral"]) == ({"accuracy": 1.0}, 1)


def test_rouge_l_scores_non_latin_text():
    assert rouge_l(["東京です"], ["東京です"]) == pytest.approx(1.0)
    assert rouge_l(["Привет, как дела?"], ["Привет, как дела?"]) == pytest.approx(1.0)
    # CJK characters count one token each: LCS of 東京です / 京都です is 京です, 3 of 4 -> P = R = 0.75
    assert rouge_l(["東京です"], ["京都です"]) == pytest.approx(0.75)


def test_score_nli_accuracy():
    preds = ["Entailment.", "It is neutral", "This contradicts it", "no clue"]
    refs = ["entailment", "contradiction", "contradiction", "neutral"]
    # hits: 1, 0, 1, 0 -> 2 of 4
    assert score("nli", preds, refs) == ({"accuracy": pytest.approx(0.5)}, 0)


@pytest.mark.parametrize("task", ["qa", "summarization", "conversation"])
def test_score_text_ranges(task):
    preds = ["The capital of France is Paris.", "A big dog ran in the park today.", "nothing alike at all"]
    refs = ["Paris is the capital of France.", "The big dog ran to the park.", "completely different words here"]
    s, unscorable = score(task, preds, refs)
    assert unscorable == 0
    assert set(s) == {"rougeL", "bleu"}
    assert 0.0 <= s["rougeL"] <= 1.0
    assert 0.0 <= s["bleu"] <= 100.0
    # Partially overlapping answers: strictly between the extremes.
    assert 0.0 < s["rougeL"] < 1.0
    assert s["bleu"] < 100.0


def test_score_identical_text_is_perfect():
    refs = ["The capital of France is Paris and it is big.", "A small cat sat on the old red mat."]
    s, _ = score("qa", list(refs), refs)
    assert s["rougeL"] == pytest.approx(1.0)
    assert s["bleu"] == pytest.approx(100.0)


def test_score_skips_rows_without_reference():
    preds = ["The cat sat on the mat.", "totally unrelated junk", "Paris is nice."]
    refs = ["The cat sat on the mat.", None, "Paris is nice."]
    s, unscorable = score("qa", preds, refs)
    assert unscorable == 0
    assert s["rougeL"] == pytest.approx(1.0)
    assert s["bleu"] == pytest.approx(100.0)
    # None references are skipped and not counted as unscorable.
    assert score("math", ["5", "x", "6"], ["5", None, "7"]) == ({"accuracy": 0.5, "accuracy_lenient": 0.5}, 0)
    assert score("nli", ["neutral", "x"], ["neutral", None]) == ({"accuracy": 1.0}, 0)


def test_score_all_references_missing():
    assert score("qa", ["a", "b"], [None, None]) == ({}, 0)
    assert score("math", [], []) == ({}, 0)
    assert score("nli", ["a"], [None]) == ({}, 0)


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


# --- issue 5: math answers read as their value ---------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    # Fractions read as their value (before: "1/4" and "3/4" both read 4).
    ("The answer is 1/4.", 0.25),
    ("3/4", 0.75),
    ("-1/2", -0.5),
    ("It is -1/2 of the total", -0.5),
    ("He ate 1 1/2 pizzas", 1.5),
    ("-1 1/2", -1.5),
    ("2 5/4", 1.25),                      # not a proper fraction: two numbers, the last wins
    (r"\frac{3}{4}", 0.75),
    (r"\dfrac{3}{4}", 0.75),
    (r"\tfrac{1}{8}", 0.125),
    (r"\frac12", 0.5),
    (r"-\frac{1}{2}", -0.5),
    (r"\frac{-1}{2}", -0.5),
    (r"2\frac{1}{2}", 2.5),
    ("1½ cups", 1.5),
    ("3/4/2023", 2023.0),                 # a date, not a fraction
    ("1/0", None),                        # no value
    # A range is not a negative number (before: -7).
    ("It takes 5-7 days.", 7.0),
    ("COVID-19", 19.0),
    ("x-3", 3.0),
    ("5 - 7 = -2", -2.0),
    ("x = -3", -3.0),
    ("(-3)", -3.0),
    ("x=-3", -3.0),
    ("The answer is **-3**.", -3.0),
    ("\u22124", -4.0),
    # Currency and percent are units.
    ("$1,250", 1250.0),
    ("-$5", -5.0),
    ("$-5", -5.0),
    (r"\$1{,}250", 1250.0),
    (r"1\,250", 1250.0),
    ("25%", 25.0),
    ("12.5% of them", 12.5),
    (".5", 0.5),
    ("1.2.3", 1.2),
])
def test_extract_number_values(text, expected):
    assert extract_number(text) == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize("text, expected", [
    # GSM8K: the number after "####" wins over every number in the working.
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
     "altogether in April and May.\n#### 72", 72.0),
    ("She pays 3 * 6 = 18 dollars.\n#### 18", 18.0),
    (r"So $x = \boxed{\frac{1}{2}}$, which is 0.5 of 10 apples.", 0.5),
    (r"\boxed{x = -3} since 2 + 1 = 3", -3.0),
    ("The answer is 5. Check: 2 + 3 = 5 and 10 - 5 = 5, so 10 in all.", 5.0),
    ("**Answer:** 42 because 40 + 2", 42.0),
    ("Final answer:\n\n17\n\nCheck: 3 + 4 = 7", 17.0),
    ("The final answer is $1,250.00.", 1250.0),
    # The last statement that holds a number wins ("the answer is 5 ... the answer is 6").
    ("At first the answer is 5. Wait, recount: the answer is 6, not 7.", 6.0),
    (r"The answer is 5. Final answer: $\boxed{6}$", 6.0),
    # A stated answer with no number: the last number in the text.
    ("The answer is seven. 3 + 4 = 7", 7.0),
    ("To find the answer, add 3 and 4: 7", 7.0),  # "find the answer," states nothing
])
def test_extract_number_stated_answer_wins(text, expected):
    assert extract_number(text) == pytest.approx(expected)


def test_score_math_fractions_ranges_and_references():
    preds = ["The answer is 1/4.", "0.75", "It takes 5-7 days.", "That is $1,250.", "25%", "0.25",
             "Working: 3 + 15 = 18. The answer is 18."]
    refs = ["3/4", "3/4", "-7", "1250", "25", "25%", "Janet makes 9 * 2 = $<<9*2=18>>18.\n#### 18"]
    # lenient hits: 1/4 != 3/4, 0.75 == 3/4, 7 != -7, 1250, 25 == 25, 0.25 != 25, 18 == 18 -> 4 of 7;
    # strict: "That is $1,250." states no final answer (a miss) -> 3 of 7
    assert score("math", preds, refs) == ({"accuracy": pytest.approx(3 / 7),
                                           "accuracy_lenient": pytest.approx(4 / 7)}, 0)


def test_score_math_tolerance_is_1e_6():
    assert score("math", ["0.333", "0.3333333"], ["1/3", "1/3"]) == ({"accuracy": 0.5, "accuracy_lenient": 0.5}, 0)


# --- issue 5: NLI labels the answer settles on ---------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("This is not entailment; it is a contradiction.", "contradiction"),
    ("Answer with one word: entailment, neutral, or contradiction. Answer: contradiction", "contradiction"),
    ("Label: entailment / neutral / contradiction\nLabel: neutral", "neutral"),
    ("Answer: contradiction. I also considered neutral.", "contradiction"),
    ("Answer: **Contradiction**", "contradiction"),
    ("Answer: not entailment, it is a contradiction", "contradiction"),
    ("It is a contradiction, so not entailment.", "contradiction"),
    ("At first it seems neutral, but it is actually a contradiction.", "contradiction"),
    ("neither entailment nor contradiction, it's neutral", "neutral"),
    ("No, this is entailment.", "entailment"),
    # Binary labels, in every spelling.
    ("not_entailment", "not_entailment"),
    ("NOT_ENTAILMENT", "not_entailment"),
    ("not entailment", "not_entailment"),
    ("Non-entailment", "not_entailment"),
    ("non entailment", "not_entailment"),
    ("The answer is not entailment.", "not_entailment"),
    ("The premise does not entail the hypothesis.", "not_entailment"),
    ("It doesn't entail it.", "not_entailment"),
    ("It isn\u2019t an entailment.", "not_entailment"),
    # Negated neutral / contradiction, or only an option list: no label is settled on.
    ("It is not neutral.", None),
    ("There is no contradiction here.", None),
    ("entailment, neutral, or contradiction?", None),
    ("entailment or not_entailment", None),
    ("0", None),
])
def test_extract_nli_label_settles(text, expected):
    assert extract_nli_label(text) == expected


def test_score_nli_binary_labels():
    preds = ["not entailment", "Entailment.", "It is a contradiction.", "neutral", "The premise entails it."]
    refs = ["not_entailment", "entailment", "not_entailment", "not_entailment", "not_entailment"]
    # A not_entailment reference is matched by not_entailment, neutral or contradiction -> 4 of 5.
    assert score("nli", preds, refs) == ({"accuracy": pytest.approx(4 / 5)}, 0)


def test_score_nli_not_entailment_is_not_a_three_way_label():
    """In a three-way set, "not X" never reads as X and "not entailment" settles neither on
    neutral nor on contradiction."""
    preds = ["not entailment", "not entailment", "not entailment", "not contradiction"]
    refs = ["entailment", "neutral", "contradiction", "contradiction"]
    assert score("nli", preds, refs) == ({"accuracy": 0.0}, 0)


def test_score_nli_unscorable_references_are_counted_not_dropped_silently():
    """One wrong row with an integer label used to be dropped, reporting accuracy 1.0."""
    preds = ["entailment", "neutral", "contradiction"]
    refs = ["entailment", "neutral", "2"]
    assert score("nli", preds, refs) == ({"accuracy": 1.0}, 1)
    assert score("nli", ["entailment", "x"], ["-1", "whatever"]) == ({}, 2)


def test_score_nli_label_map_reads_integer_labels():
    label_map = {"0": "entailment", "1": "neutral", "2": "contradiction"}
    preds = ["entailment", "neutral", "entailment", "contradiction", "neutral"]
    refs = ["0", "1", "2", " 2 ", "-1"]  # "-1" (SNLI: no gold label) is not in the map
    assert score("nli", preds, refs, label_map=label_map) == ({"accuracy": pytest.approx(3 / 4)}, 1)
    # Without the map the integers name no label: all five unscorable.
    assert score("nli", preds, refs) == ({}, 5)
    # A binary map (RTE as integers).
    assert score("nli", ["contradiction", "entailment"], ["1", "0"],
                 label_map={"0": "entailment", "1": "not_entailment"}) == ({"accuracy": 1.0}, 0)


def test_score_nli_label_map_value_must_name_a_label():
    with pytest.raises(ValueError, match=r"data.label_map\['1'\] = 'maybe' names no NLI label"):
        score("nli", ["neutral"], ["1"], label_map={"0": "entailment", "1": "maybe"})


def test_label_map_applies_to_nli_only():
    """A mixed dataset's math reference "0" stays the number 0."""
    assert score("math", ["0"], ["0"], label_map={"0": "entailment"}) == ({"accuracy": 1.0, "accuracy_lenient": 1.0}, 0)


# --- issue 5: BLEU tokenizer by script -----------------------------------------------------------

def test_bleu_identical_chinese_is_100():
    zh = ["我喜欢吃苹果。", "今天天气很好，我们去公园散步吧。"]
    assert bleu_tokenizer(zh) == "zh"
    assert bleu(zh, zh) == pytest.approx(100.0)
    # The 13a tokenizer reads each sentence as one word: the bug this guards against.
    assert bleu(zh, zh, tokenize="13a") == pytest.approx(0.0)
    s, unscorable = score("qa", zh, zh)
    assert s["bleu"] == pytest.approx(100.0) and unscorable == 0


def test_bleu_chinese_partial_match_is_between():
    assert 0.0 < bleu(["我喜欢吃苹果。"], ["我喜欢吃香蕉。"]) < 100.0


def test_bleu_identical_thai_is_100():
    th = ["ฉันชอบกินข้าวมาก", "วันนี้อากาศดีมาก"]
    assert bleu_tokenizer(th) == "char"
    assert bleu(th, th) == pytest.approx(100.0)


def test_bleu_japanese_tokenizer():
    import importlib.util

    ja = ["東京は日本の首都です。"]
    mecab = all(importlib.util.find_spec(m) for m in ("MeCab", "ipadic"))
    assert bleu_tokenizer(ja) == ("ja-mecab" if mecab else "char")
    assert bleu(ja, ja) == pytest.approx(100.0)


def test_bleu_tokenizer_rule():
    assert bleu_tokenizer(["The cat sat on the mat."]) == "13a"
    assert bleu_tokenizer(["Мама мыла раму"]) == "13a"
    assert bleu_tokenizer(["한국어 문장입니다"]) == "13a"
    # Any Han without kana: zh (it tokenizes the non-Chinese text as 13a does).
    assert bleu_tokenizer(["The city 东京 is large and busy."]) == "zh"
    # Thai as a minority in English text keeps 13a (char would split the English words).
    assert bleu_tokenizer(["The word ข้าว means rice in the Thai language."]) == "13a"
    # Chosen from the references; the predictions only when the references have no letters.
    assert bleu_tokenizer(["The cat sat."], ["我喜欢吃苹果"]) == "13a"
    assert bleu_tokenizer(["42"], ["我喜欢吃苹果"]) == "zh"


def test_flores200_is_not_chosen():
    """flores200 downloads its model at first use; nothing may be downloaded at run time."""
    texts = ["ฉันชอบกินข้าวมาก", "我喜欢吃苹果", "東京は日本の首都です", "hello there", "नमस्ते दुनिया"]
    assert {bleu_tokenizer([t]) for t in texts} <= {"zh", "ja-mecab", "char", "13a"}


# --- issue 5: ROUGE-L keeps combining marks in their word ----------------------------------------

def test_rouge_l_thai_vowel_marks_matter():
    assert rouge_tokens("ดู") == ["ดู"]
    assert rouge_l(["ดู"], ["ดี"]) == 0.0   # "look" vs "good"; was 1.0
    assert rouge_l(["ดู"], ["ดู"]) == pytest.approx(1.0)


def test_rouge_l_thai_is_split_into_character_clusters():
    # A letter and its marks form one token: ฉั น ช อ บ กิ น ข้ า ว
    assert rouge_tokens("ฉันชอบกินข้าว") == ["ฉั", "น", "ช", "อ", "บ", "กิ", "น", "ข้", "า", "ว"]
    # ฉันชอบกิน (7 clusters) + ข้ า ว / ป ล า: 10 clusters each, LCS 7 + า = 8 -> F1 0.8
    assert rouge_l(["ฉันชอบกินปลา"], ["ฉันชอบกินข้าว"]) == pytest.approx(0.8)


def test_rouge_l_devanagari_matras_belong_to_their_word():
    assert rouge_tokens("किताब पढ़ो") == ["किताब", "पढ़ो"]
    assert rouge_l(["दिन"], ["दान"]) == 0.0     # "day" vs "donation"; was 1.0
    assert rouge_l(["दिन"], ["दिन"]) == pytest.approx(1.0)


def test_rouge_l_arabic_hebrew_vowel_points_are_optional():
    assert rouge_tokens("كَتَبَ") == ["كتب"]
    assert rouge_tokens("كـتب") == ["كتب"]        # tatweel
    assert rouge_tokens("שָׁלוֹם") == ["שלום"]
    assert rouge_l(["كَتَبَ"], ["كتب"]) == pytest.approx(1.0)   # was 0.0 (split into letters)
    assert rouge_l(["كتب"], ["كتاب"]) == 0.0


def test_rouge_tokens_latin_and_composed_forms():
    assert rouge_tokens("Hello, world_x 3.5 café") == ["hello", "world", "x", "3", "5", "café"]
    # NFC: "e" + combining acute equals the precomposed "é".
    assert rouge_tokens("cafe\u0301") == ["café"]
    assert rouge_tokens("東京です abc") == ["東", "京", "で", "す", "abc"]


# --- issue 6: final answers (generate's filters) and the configured marker ---------------------

from raydistill.tasks import agrees_with_reference, final_answer  # noqa: E402

GSM8K_ANSWER = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                "altogether in April and May.\n#### 72")


@pytest.mark.parametrize("task, text, expected", [
    ("math", GSM8K_ANSWER, "72"),
    ("math", "Each pack has 4, so 3 packs hold 3 * 4 = 12.\n#### 12 pencils", "12"),
    ("math", r"Adding the parts gives $\boxed{\frac{3}{4}}$.", "0.75"),
    ("math", "The total is 1,250 + 250 = 1,500, so the answer is $1,500.", "1500"),
    ("math", "**Final answer:** -2.5", "-2.5"),
    ("math", "Final answer:\n\n17", "17"),
    # No stated final answer: a last number in the working is not one.
    ("math", "First 3 + 4 = 7, then 7 * 2 = 14", None),
    ("math", "The answer is seven.", None),
    ("math", "####", None),
    ("math", "", None),
    ("qa", "The Eiffel Tower stands in Paris.\n#### Paris", "Paris"),
    ("qa", "Step 1: the tower is in France.\n####   **Paris, France**  \n", "Paris, France"),
    ("qa", "The city is\n####\n\nParis\nThat is all.", "Paris"),       # alone on the next line
    ("qa", "#### Lyon\nWait, no.\n#### Paris", "Paris"),                # the last one
    ("qa", "#### Paris\n####", "Paris"),                               # the last one that has text
    ("qa", "The capital of France is Paris.", None),
    ("qa", "The answer is Paris.", None),                              # QA reads only the marker
    ("nli", "The premise says a dog runs, so an animal moves. Answer: entailment", "entailment"),
    ("nli", "Contradiction.", "contradiction"),
    ("nli", "It is not entailed.", "not_entailment"),
    ("nli", "entailment, neutral or contradiction?", None),            # the options, not an answer
    ("nli", "I cannot tell.", None),
    ("summarization", "Ann wants tea; Bob makes it.\n#### tea", None),
    ("conversation", "The answer is 42.", None),
])
def test_final_answer(task, text, expected):
    assert final_answer(task, text) == expected


def test_final_answer_with_a_configured_marker():
    assert final_answer("qa", "Reasoning.\nRESULT: Rome", "RESULT:") == "Rome"
    assert final_answer("qa", "Reasoning.\n#### Rome", "RESULT:") is None
    assert final_answer("math", "3 + 4 = 7\nRESULT: 7", "RESULT:") == "7"
    assert final_answer("math", "3 + 4 = 7\n#### 7", "RESULT:") == "7"  # GSM8K's #### always counts
    assert extract_number("RESULT: 5, not 6 or 7", "RESULT:") == 5.0
    assert extract_number("RESULT: 5, not 6 or 7") == 7.0  # without the marker: the last number


def test_final_answer_unknown_task():
    with pytest.raises(ValueError, match="unknown task 'poetry'"):
        final_answer("poetry", "x")


@pytest.mark.parametrize("task, answer, reference, expected", [
    ("math", GSM8K_ANSWER, "72", True),
    ("math", GSM8K_ANSWER, "Natalia sold 48+24 = 72 clips.\n#### 72", True),
    ("math", "#### 0.75", "3/4", True),
    ("math", "#### 71", "72", False),
    ("math", "I do not know", "72", False),
    ("math", "#### 72", "seventy-two", None),                # unreadable reference
    ("math", "#### 72", None, None),
    ("nli", "Answer: contradiction", "contradiction", True),
    ("nli", "neutral", "not_entailment", True),
    ("nli", "entailment", "not_entailment", False),
    ("nli", "neutral", "0", None),                           # integer label without data.label_map
    ("qa", "It stands in Paris.\n#### Paris", "Paris", True),
    ("qa", "#### The city of Paris, France", "paris", True),  # the reference's words, in the answer
    ("qa", "#### Paris", "Paris, France", False),
    ("qa", "#### Lyon", "Paris", False),
    ("qa", "Paris is the capital.", "Paris", True),          # no final answer: the whole answer
    ("qa", "#### Paris", "Reading the text...\n#### Paris", True),
    ("qa", "#### Paris", "  ", None),
    ("summarization", "Bob makes tea.", "Bob makes tea.", None),
    ("conversation", "Hi", "Hello", None),
])
def test_agrees_with_reference(task, answer, reference, expected):
    assert agrees_with_reference(task, answer, reference) is expected


def test_agrees_with_reference_label_map():
    lm = {"0": "entailment", "1": "neutral", "2": "contradiction"}
    assert agrees_with_reference("nli", "entailment", "0", label_map=lm) is True
    assert agrees_with_reference("nli", "neutral", "0", label_map=lm) is False


def test_score_qa_reads_the_final_answer():
    """Generation asks QA answers to end with '#### <answer>': evaluation scores that answer."""
    preds = ["The tower is in the French capital.\n#### Paris", "#### Rome"]
    refs = ["Paris", "Rome"]
    assert score("qa", preds, refs)[0]["rougeL"] == pytest.approx(1.0)
    # Without a marker the whole text is scored, as before.
    assert score("qa", ["The tower is in Paris"], ["Paris"])[0]["rougeL"] < 1.0
    # A configured marker.
    assert score("qa", ["Think.\nRESULT: Rome"], ["Rome"], marker="RESULT:")[0]["rougeL"] == pytest.approx(1.0)


def test_score_math_with_a_configured_marker():
    preds = ["3 + 4 = 7\nRESULT: 7 apples, 2 left", "RESULT: 5, then 6"]
    assert score("math", preds, ["7", "5"], marker="RESULT:") == ({"accuracy": 1.0, "accuracy_lenient": 1.0}, 0)
    assert score("math", preds, ["7", "5"]) == ({"accuracy": 0.0, "accuracy_lenient": 0.0}, 0)


# --- issue 15: strict math accuracy --------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("2 4 6 8 10 12 14", None),  # a degenerate list of numbers states no final answer
    ("It is 14.", None),
    ("5-7 days, maybe 14", None),
    ("14", 14.0), (" $1,250. ", 1250.0), ("25%", 25.0), ("-3", -3.0), (r"\frac{1}{2}", 0.5),
    ("Counting: 2 4 6 8 10 12 14\n#### 14", 14.0),
    ("so we get 2, 4, 6. The answer is 14", 14.0),
    (r"2 + 12 = \boxed{14}", 14.0),
    ("The answer is seven. 3 + 4 = 7", None),  # a stated answer without a number, then a bare number
])
def test_extract_number_strict_reads_only_a_stated_answer(text, expected):
    assert extract_number(text, strict=True) == (None if expected is None else pytest.approx(expected))


def test_score_math_strict_beside_lenient():
    """The degenerate answer that the last-number reading scored as correct is a strict miss."""
    preds = ["2 4 6 8 10 12 14", "Step: 7 + 7.\n#### 14", "The answer is 14.", r"\boxed{14}", "I get 14"]
    metrics, unscorable = score("math", preds, ["14"] * 5)
    assert unscorable == 0
    assert metrics == {"accuracy": pytest.approx(3 / 5), "accuracy_lenient": 1.0}


# --- issue 15: ROUGE-L keeps emoji and symbols ---------------------------------------------------

@pytest.mark.parametrize("text", ["🎉🎉👍", "👍🏽 ❤️", "👨‍👩‍👧 🇫🇷", "東京です", "😀", "?!"])
def test_rouge_l_identical_texts_without_ascii_letters_score_one(text):
    """rouge-score's default tokenizer keeps only [a-z0-9]: identical emoji-only answers scored 0.0."""
    assert rouge_l([text], [text]) == pytest.approx(1.0)


def test_rouge_tokens_keep_emoji_sequences_whole():
    assert rouge_tokens("great 👍🏽!") == ["great", "👍🏽"]  # skin tone joins its emoji
    assert rouge_tokens("👨‍👩‍👧🇫🇷🇩🇪") == ["👨‍👩‍👧", "🇫🇷", "🇩🇪"]  # one ZWJ family, two flags
    assert rouge_tokens("❤️❤") == ["❤️", "❤"]  # the variation selector stays with its heart
    # different emoji differ: 2 of 3 tokens in common -> P = R = 2/3
    assert rouge_l(["🎉 👍 😀"], ["🎉 👍 😢"]) == pytest.approx(2 / 3)
    assert rouge_l(["东京很大"], ["东京很小"]) == pytest.approx(3 / 4)


def test_rouge_l_of_plain_english_matches_rouge_score_default():
    """The Unicode tokenizer changes nothing for plain English text."""
    from rouge_score import rouge_scorer

    pred, ref = "The quick brown foxes were jumping over lazy dogs.", "A quick brown fox jumped over the lazy dog!"
    default = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(ref, pred)["rougeL"].fmeasure
    assert 0.3 < default < 1.0
    assert rouge_l([pred], [ref]) == pytest.approx(default)
