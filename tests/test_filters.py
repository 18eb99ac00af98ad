"""Tests of raydistill.generate.filters: reject reasons on hand-made generated rows, duplicates on a
real Ray Dataset, and the reject counts in the evaluation report."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from raydistill.config import load
from raydistill.evaluate.figures import MODEL_NAMES
from raydistill.evaluate.render import write_markdown
from raydistill.evaluate.report import build_report, corpus_rejects
from raydistill.generate import GENERATED_SCHEMA
from raydistill.generate.filters import REASONS, duplicate_ids, reject_reasons
from raydistill.schema import SCHEMA_VERSION

GSM8K_ANSWER = ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.\n"
                "#### 72")


def _row(pid: str, task: str = "conversation", response: str | None = "Hello! How can I help?", *,
         reference: str | None = None, finish: str = "stop", error: str | None = None,
         user: str | None = None) -> dict:
    return {"prompt_id": pid, "split": "train", "task": task,
            "messages": [{"role": "user", "content": user if user is not None else f"question {pid}"}],
            "reference": reference, "response": response, "response_token_ids": [1, 2],
            "finish_reason": finish, "prompt_tokens": 5, "response_tokens": 2, "latency_s": 0.1,
            "batch_id": "b0", "top_logprobs_ids": None, "top_logprobs": None, "error": error}


def _table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=GENERATED_SCHEMA)


def _reasons(rows: list[dict], *overrides: str, duplicates=None) -> list[str | None]:
    out = reject_reasons(_table(rows), load(None, list(overrides)), duplicates)
    assert out.type == pa.string() and len(out) == len(rows)
    return out.to_pylist()


def test_reasons_are_the_documented_order():
    assert REASONS == ("error", "empty", "truncated", "no_final_answer", "reference_mismatch", "duplicate")


def test_each_reason_on_its_own():
    rows = [
        _row("ok-conv"),
        _row("err", response="", finish="error", error="prompt has 2000 tokens; max_model_len is 1024"),
        _row("blank", response="  \n\t"),
        _row("null", response=None),
        _row("cut", response="The story goes on and on", finish="length"),
        _row("math-none", "math", "We add 3 and 4 and get 7"),  # a bare last number is no final answer
        _row("qa-none", "qa", "Paris is the capital of France."),
        _row("nli-none", "nli", "Hard to say."),
        _row("math-bad", "math", GSM8K_ANSWER, reference="Natalia sold 48+24 = 71 clips.\n#### 71"),
        _row("dup", "qa", "It is Paris.\n#### Paris"),
    ]
    got = _reasons(rows, "filter.truncated=true", "filter.match_reference=true", duplicates={"dup"})
    assert got == [None, "error", "empty", "empty", "truncated", "no_final_answer", "no_final_answer",
                   "no_final_answer", "reference_mismatch", "duplicate"]


def test_kept_answers_of_every_task():
    rows = [
        _row("m1", "math", GSM8K_ANSWER, reference="#### 72"),
        _row("m2", "math", "So the total is $\\boxed{\\frac{3}{4}}$.", reference="0.75"),
        _row("m3", "math", "Each box holds 12, so the answer is 1,250 pencils.", reference="1250"),
        _row("q1", "qa", "The Eiffel Tower is in Paris, France.\n#### Paris", reference="Paris"),
        _row("n1", "nli", "The premise entails the hypothesis.\nAnswer: entailment", reference="entailment"),
        _row("n2", "nli", "neutral", reference="not_entailment"),
        _row("s1", "summarization", "Ann asks for tea and Bob makes it.", reference="Bob makes tea for Ann."),
        _row("c1", "conversation", "Sure, I can help with your order.", reference="Happy to help."),
    ]
    assert _reasons(rows, "filter.truncated=true", "filter.match_reference=true") == [None] * len(rows)


def test_error_rows_are_rejected_whatever_the_flags():
    rows = [_row("e1", response="", finish="error", error="boom"),
            _row("e2", response="partial text", finish="error", error="engine died"),
            _row("e3", response="text", finish="stop", error="recorded error")]
    off = ["filter.empty=false", "filter.truncated=false", "filter.no_final_answer=false",
           "filter.match_reference=false", "filter.duplicates=false"]
    assert _reasons(rows, *off) == ["error"] * 3


def test_first_reason_wins():
    """Each row qualifies for two reasons; it gets the earlier one of REASONS."""
    rows = [
        _row("a", "math", "", finish="error", error="boom"),                      # error + empty
        _row("b", "math", " ", finish="length"),                                 # empty + truncated
        _row("c", "math", "We add 3 and 4", finish="length"),                    # truncated + no final answer
        _row("d", "qa", "Lyon, I think", reference="Paris"),                     # no final answer + mismatch
        _row("e", "qa", "#### Lyon", reference="Paris"),                         # mismatch + duplicate
        _row("f", "qa", "#### Paris", reference="Paris"),                        # duplicate only
    ]
    got = _reasons(rows, "filter.truncated=true", "filter.match_reference=true", duplicates={"a", "b", "c", "d",
                                                                                             "e", "f"})
    assert got == ["error", "empty", "truncated", "no_final_answer", "reference_mismatch", "duplicate"]


@pytest.mark.parametrize("flag, row, reason", [
    ("filter.empty", _row("x", response="   "), "empty"),
    ("filter.truncated", _row("x", response="and then", finish="length"), "truncated"),
    ("filter.no_final_answer", _row("x", "qa", "Paris, probably."), "no_final_answer"),
    ("filter.match_reference", _row("x", "math", "#### 5", reference="6"), "reference_mismatch"),
    ("filter.duplicates", _row("x"), "duplicate"),
])
def test_each_flag_off_keeps_the_row(flag, row, reason):
    dups = {"x"} if flag == "filter.duplicates" else None
    assert _reasons([row], f"{flag}=true", duplicates=dups) == [reason]
    assert _reasons([row], f"{flag}=false", duplicates=dups) == [None]


def test_defaults_keep_truncated_and_mismatching_answers():
    """FilterConfig defaults: empty, no_final_answer and duplicates on; truncated and match_reference off."""
    rows = [_row("cut", response="and then", finish="length"), _row("m", "math", "#### 5", reference="6"),
            _row("blank", response=""), _row("q", "qa", "Paris."), _row("d")]
    assert _reasons(rows, duplicates={"d"}) == [None, None, "empty", "no_final_answer", "duplicate"]


def test_match_reference_keeps_rows_without_a_checkable_reference():
    rows = [
        _row("no-ref", "math", "#### 5"),
        _row("unreadable", "math", "#### 5", reference="seven"),
        _row("int-label", "nli", "contradiction", reference="0"),  # no data.label_map: "0" names no label
        _row("blank-ref", "qa", "#### Paris", reference="  "),
        _row("summary", "summarization", "Completely unrelated words.", reference="Bob makes tea."),
    ]
    assert _reasons(rows, "filter.match_reference=true") == [None] * len(rows)


def test_match_reference_uses_the_label_map():
    rows = [_row("a", "nli", "contradiction", reference="0"), _row("b", "nli", "entailment", reference="0")]
    got = _reasons(rows, "filter.match_reference=true",
                   'data.label_map={"0": entailment, "1": neutral, "2": contradiction}')
    assert got == ["reference_mismatch", None]


def test_configured_marker():
    """task_prompts.final_answer_marker: QA reads only that marker; math also keeps GSM8K's ####."""
    rows = [_row("q1", "qa", "Reasoning.\nFINAL: Paris", reference="Paris"),
            _row("q2", "qa", "Reasoning.\n#### Paris", reference="Paris"),
            _row("m1", "math", "Reasoning 3 + 4.\nFINAL: 7", reference="7"),
            _row("m2", "math", "Reasoning 3 + 4.\n#### 7", reference="7")]
    got = _reasons(rows, "task_prompts.final_answer_marker=FINAL:", "filter.match_reference=true")
    assert got == [None, "no_final_answer", None, None]


def test_missing_columns_are_named():
    table = _table([_row("a")]).drop_columns(["finish_reason", "reference"])
    with pytest.raises(ValueError, match="finish_reason, error|reference, finish_reason") as e:
        reject_reasons(table, load(None))
    assert "finish_reason" in str(e.value) and "reference" in str(e.value)


def test_empty_table():
    assert reject_reasons(_table([]), load(None)).to_pylist() == []


# --- duplicates on a real Ray Dataset -----------------------------------------------------------

def _dup_rows() -> list[dict]:
    same = dict(task="qa", response="It is Paris.\n#### Paris", user="Capital of France?")
    return [
        _row("p3", **same), _row("p1", **same), _row("p2", **same),           # p1 kept, p2 p3 duplicates
        _row("p0", "qa", "It is Lyon.\n#### Lyon", user="Capital of France?"),  # same messages, other answer
        _row("p4", "qa", "It is Paris.\n#### Paris", user="Capital of Italy?"),  # same answer, other messages
        _row("x9", "conversation", "Hi!", user="hello"), _row("x10", "conversation", "Hi!", user="hello"),
        _row("n1", "conversation", None, user="fails"), _row("n2", "conversation", "", user="fails"),
    ]


def test_duplicate_ids_keeps_the_smallest_id(ray_local):
    import ray

    rows = _dup_rows()
    # Several blocks, so that duplicates meet only through the groupby shuffle.
    ds = ray.data.from_arrow([_table(rows[i:i + 2]) for i in range(0, len(rows), 2)])
    assert ds.num_blocks() > 1
    # "x10" < "x9" as strings: the smallest id in string order is kept.
    # A null response and an empty one are different answers.
    assert duplicate_ids(ds) == {"p2", "p3", "x9"}


def test_duplicate_ids_without_duplicates(ray_local):
    import ray

    ds = ray.data.from_arrow(_table([_row("a"), _row("b"), _row("c", response="other")]))
    # 4 hash partitions instead of Ray's default 200 (test_duplicate_ids_keeps_the_smallest_id
    # runs the default): the same answer, without 200 shuffle tasks per call
    assert duplicate_ids(ds, partitions=4) == set()
    assert duplicate_ids(ray.data.from_arrow(_table([])), partitions=4) == set()


def test_filter_in_map_batches_counts_every_reason(ray_local):
    """The stage's use: reject_reasons inside map_batches, duplicates from duplicate_ids over the rows
    the other reasons keep; every reason counted."""
    import ray
    from ray.data.expressions import col

    rows = _dup_rows()[:3] + [
        _row("e", response="", finish="error", error="prompt too long"), _row("b", response=" "),
        _row("t", response="and so on", finish="length"), _row("n", "math", "about 3 or 4"),
        _row("r", "math", "#### 9", reference="8"), _row("k", "math", "#### 8", reference="8"),
    ]
    cfg = load(None, ["filter.truncated=true", "filter.match_reference=true"])
    ds = ray.data.from_arrow([_table(rows[:4]), _table(rows[4:])])

    def tag(batch: pa.Table, cfg, duplicates) -> pa.Table:
        return batch.append_column("reject_reason", reject_reasons(batch, cfg, duplicates))

    first = ds.map_batches(tag, batch_format="pyarrow", fn_kwargs={"cfg": cfg, "duplicates": None}).materialize()
    kept = first.filter(expr=col("reject_reason").is_null())
    dups = duplicate_ids(kept, partitions=4)  # as the stage passes them (runtime.shuffle_partitions)
    assert dups == {"p2", "p3"}
    final = ds.map_batches(tag, batch_format="pyarrow", fn_kwargs={"cfg": cfg, "duplicates": dups})
    got = {r["prompt_id"]: r["reject_reason"] for r in final.take_all()}
    assert got == {"p1": None, "p2": "duplicate", "p3": "duplicate", "e": "error", "b": "empty", "t": "truncated",
                   "n": "no_final_answer", "r": "reference_mismatch", "k": None}
    counts = {reason: list(got.values()).count(reason) for reason in REASONS}
    assert counts == {"error": 1, "empty": 1, "truncated": 1, "no_final_answer": 1, "reference_mismatch": 1,
                      "duplicate": 2}


# --- the report shows the corpus's reject counts --------------------------------------------------

def _answers() -> dict[str, pa.Table]:
    rows = [_row("t1", "math", "#### 4", reference="4"), _row("t2", "qa", "It is Rome.\n#### Rome", reference="Rome")]
    table = _table([dict(r, split="test") for r in rows]).append_column("round", pa.array([0, 0], pa.int32()))
    return {n: table for n in MODEL_NAMES}


def _write_manifest(folder, **fields) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION, **fields}))


def test_report_shows_corpus_reject_counts(tmp_path):
    corpus = tmp_path / "corpus"
    rejects = {"error": 1, "empty": 2, "truncated": 0, "no_final_answer": 3, "reference_mismatch": 0, "duplicate": 1}
    _write_manifest(corpus, rows=13, rejects=rejects)  # manifest "rows" = rows kept
    got = corpus_rejects(corpus)
    assert got == {"rows_kept": 13, "rows_rejected": 7, "rejects": rejects}
    answers = _answers()
    report = build_report(answers, {n: {} for n in MODEL_NAMES}, split="test", teacher="t", engine="hf",
                          label_map=None, max_ratio_spread=0.25, warn_retained_below=0.5,
                          extra={"corpus_rejects": got})
    assert json.loads(json.dumps(report, allow_nan=False))["corpus_rejects"] == got
    # The QA answer's final answer "Rome" is scored against the reference: ROUGE-L 1.
    assert report["models"]["teacher"]["metrics"]["qa"]["rougeL"] == pytest.approx(1.0)
    write_markdown(report, answers, tmp_path / "report.md")
    md = (tmp_path / "report.md").read_text()
    assert "## Teacher corpus\n\n13 teacher answers kept for training, 7 left out" in md
    assert "| reject reason | rows |\n|---|---|\n| error | 1 |\n| empty | 2 |\n| truncated | 0 |\n" in md
    assert "| no_final_answer | 3 |\n| reference_mismatch | 0 |\n| duplicate | 1 |\n" in md


def test_report_without_corpus_rejects(tmp_path):
    """A corpus made before filtering (no rejects in its manifest), or none at all: null, no section."""
    _write_manifest(tmp_path / "old")
    assert corpus_rejects(tmp_path / "old") is None
    assert corpus_rejects(tmp_path / "absent") is None
    answers = _answers()
    report = build_report(answers, {n: {} for n in MODEL_NAMES}, split="test", teacher="t", engine="hf",
                          label_map=None, max_ratio_spread=0.25, warn_retained_below=0.5,
                          extra={"corpus_rejects": None})
    write_markdown(report, answers, tmp_path / "report.md")
    assert "Teacher corpus" not in (tmp_path / "report.md").read_text()
