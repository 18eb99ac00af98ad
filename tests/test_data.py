"""Tests of raydistill.data: readers, messages, errors, the stable split and the demo set."""

from __future__ import annotations

import csv
import json
import random
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydistill import schema
from raydistill.config import TASKS, DataConfig, demo_config_path, load
from raydistill.data import DataError, load_prompts, sample_by_task, select_split
from raydistill.tasks import extract_number

ROWS = [
    {"id": "a1", "task": "math", "prompt": "What is 2 + 3?", "reference": "5"},
    {"id": "b2", "task": "nli", "prompt": "Premise: x.\nHypothesis: y.\nLabel?", "reference": "neutral"},
    {"id": "c3", "task": "qa", "prompt": "Capital of France?", "reference": "Paris"},
    {"id": "d4", "task": "summarization", "prompt": "Summarize: it rained, \"a lot\", all day.",
     "reference": "Rain all day."},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_json(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


WRITERS = {".jsonl": write_jsonl, ".json": write_json, ".parquet": write_parquet, ".csv": write_csv}


def cfg_for(path: Path, **kw) -> DataConfig:
    kw.setdefault("task_field", "task")
    kw.setdefault("reference_field", "reference")
    return DataConfig(path=str(path), **kw)


def _load_error(path: Path, **kw) -> str:
    with pytest.raises(DataError) as ei:
        load_prompts(cfg_for(path, **kw))
    return str(ei.value)


# --- formats -----------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", list(WRITERS))
def test_each_format_reads_expected_rows(tmp_path, suffix):
    path = WRITERS[suffix](tmp_path / f"prompts{suffix}", ROWS)
    table = load_prompts(cfg_for(path))
    schema.validate(table, schema.PROMPTS_SCHEMA, str(path))
    assert table.schema.equals(schema.PROMPTS_SCHEMA)
    assert table.column("prompt_id").to_pylist() == [r["id"] for r in ROWS]
    assert table.column("task").to_pylist() == [r["task"] for r in ROWS]
    assert table.column("reference").to_pylist() == [r["reference"] for r in ROWS]
    assert table.column("messages").to_pylist() == [
        [{"role": "user", "content": r["prompt"]}] for r in ROWS
    ]
    assert set(table.column("split").to_pylist()) <= {"train", "validation", "test"}


def test_all_formats_identical(tmp_path):
    tables = {}
    for suffix, writer in WRITERS.items():
        path = writer(tmp_path / f"prompts{suffix}", ROWS)
        tables[suffix] = load_prompts(cfg_for(path)).to_pylist()
    first = tables[".jsonl"]
    for suffix, rows in tables.items():
        assert rows == first, suffix


def test_default_task_used_without_task_field(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    table = load_prompts(DataConfig(path=str(path), task="qa"))
    assert table.column("task").to_pylist() == ["qa"] * len(ROWS)


def test_null_reference_field_gives_null_references(tmp_path):
    rows = [{"id": "x", "prompt": "hello"}, {"id": "y", "prompt": "world"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    table = load_prompts(DataConfig(path=str(path), reference_field=None))
    assert table.column("reference").to_pylist() == [None, None]
    schema.validate(table, schema.PROMPTS_SCHEMA, "t")


def test_json_null_reference_stays_null(tmp_path):
    rows = [{"id": "x", "prompt": "hello", "reference": None}, {"id": "y", "prompt": "w", "reference": 7},
            {"id": "z", "prompt": "v", "reference": "  "}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    table = load_prompts(DataConfig(path=str(path), reference_field="reference"))
    assert table.column("reference").to_pylist() == [None, "7", None]  # a blank reference is none


# --- messages ----------------------------------------------------------------------------------

def test_prompt_template_fills_user_message(tmp_path):
    rows = [
        {"id": "s1", "dialogue": "Amy: hi\nBen: hello", "reference": "They greet."},
        {"id": "s2", "dialogue": "Cy: bye", "reference": "Cy leaves."},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(path=str(path), task="summarization",
                     prompt_template="Summarize this dialogue:\n{dialogue}")
    msgs = load_prompts(cfg).column("messages").to_pylist()
    assert msgs == [
        [{"role": "user", "content": "Summarize this dialogue:\nAmy: hi\nBen: hello"}],
        [{"role": "user", "content": "Summarize this dialogue:\nCy: bye"}],
    ]


def test_prompt_template_multiple_fields(tmp_path):
    rows = [{"id": "q", "question": "Who?", "context": "Bob ran.", "reference": "Bob"}]
    path = write_jsonl(tmp_path / "q.jsonl", rows)
    cfg = DataConfig(path=str(path), task="qa", prompt_template="Context: {context}\nQ: {question}")
    msgs = load_prompts(cfg).column("messages").to_pylist()
    assert msgs == [[{"role": "user", "content": "Context: Bob ran.\nQ: Who?"}]]


def test_system_prompt_comes_first(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    table = load_prompts(cfg_for(path, system_prompt="You are terse."))
    for msgs, row in zip(table.column("messages").to_pylist(), ROWS):
        assert msgs == [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": row["prompt"]},
        ]


# --- errors ------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.jsonl"
    msg = _load_error(path)
    assert str(path) in msg


@pytest.mark.parametrize("suffix, text", [
    (".jsonl", ""),
    (".jsonl", "\n  \n\n"),
    (".json", "[]"),
    (".csv", "id,prompt,reference,task\n"),
])
def test_empty_file(tmp_path, suffix, text):
    path = tmp_path / f"empty{suffix}"
    path.write_text(text)
    msg = _load_error(path)
    assert str(path) in msg
    assert "empty" in msg


def test_malformed_json_line_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(ROWS[0]), json.dumps(ROWS[1]), '{"id": "c3", "prompt": "oops",', json.dumps(ROWS[3])]
    path.write_text("\n".join(lines) + "\n")
    msg = _load_error(path)
    assert "bad.jsonl" in msg
    assert f"{path}:3:" in msg
    assert "malformed" in msg.lower()


def test_malformed_json_line_number_counts_blank_lines(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n{not json}\n")
    msg = _load_error(path)
    assert f"{path}:4:" in msg


def test_malformed_json_document_line_number(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"id": "a", "prompt": "x"},\n  {"id": "b" "prompt": "y"}\n]\n')
    msg = _load_error(path)
    assert f"{path}:3:" in msg


def test_json_line_not_an_object(tmp_path):
    path = tmp_path / "arr.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2, 3]\n")
    msg = _load_error(path)
    assert f"{path}:2:" in msg
    assert "object" in msg
    assert "list" in msg


def test_json_document_not_a_list(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text(json.dumps(ROWS[0]))
    msg = _load_error(path)
    assert str(path) in msg
    assert "dict" in msg


def test_missing_prompt_column(tmp_path):
    rows = [dict(ROWS[0]), {k: v for k, v in ROWS[1].items() if k != "prompt"} | {"text": "hi"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    msg = _load_error(path)
    assert "'prompt'" in msg
    assert "line 2" in msg
    assert str(path) in msg


def test_custom_prompt_field_missing(tmp_path):
    path = write_csv(tmp_path / "p.csv", ROWS)
    msg = _load_error(path, prompt_field="question")
    assert "'question'" in msg
    assert "line 2" in msg  # CSV: header is line 1


def test_template_names_absent_field(tmp_path):
    rows = [{"id": "s1", "text": "Amy: hi", "reference": "r"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    msg = _load_error(path, task_field=None, prompt_template="Summarize this dialogue:\n{dialogue}")
    assert "'dialogue'" in msg
    assert "line 1" in msg


def test_unknown_task_type(tmp_path):
    rows = [dict(r) for r in ROWS]
    rows[2]["task"] = "poetry"
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    msg = _load_error(path)
    assert "'poetry'" in msg
    assert "line 3" in msg


def test_missing_task_column(tmp_path):
    rows = [dict(r) for r in ROWS]
    del rows[1]["task"]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    msg = _load_error(path)
    assert "line 2: task field 'task' (data.task_field) is missing" in msg
    assert "set data.task_field=null and data.task" in msg  # says how to give every row one task


def test_missing_reference_column(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "reference"} for r in ROWS]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    msg = _load_error(path)
    assert "'reference'" in msg
    assert "line 1" in msg


def test_missing_custom_reference_column(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", ROWS)
    msg = _load_error(path, reference_field="answer")
    assert "'answer'" in msg
    assert "row 1" in msg  # parquet: data row


def test_duplicate_ids_name_both_rows(tmp_path):
    rows = [dict(r) for r in ROWS]
    rows[3]["id"] = "b2"
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    msg = _load_error(path)
    assert "'b2'" in msg
    assert "line 4" in msg
    assert "line 2" in msg


def test_duplicate_prompts_without_ids(tmp_path):
    rows = [{"prompt": "same"}, {"prompt": "other"}, {"prompt": "same"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    msg = _load_error(path, task_field=None, reference_field=None)
    assert "line 3" in msg
    assert "line 1" in msg


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("What is 2 + 2?\n")
    msg = _load_error(path)
    assert "'.txt'" in msg
    assert str(path) in msg


def test_empty_prompt_rejected(tmp_path):
    rows = [dict(ROWS[0]), dict(ROWS[1], prompt="   ")]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    msg = _load_error(path)
    assert "line 2" in msg


# --- stable split ------------------------------------------------------------------------------

def _synthetic(n: int) -> list[dict]:
    return [{"id": f"item-{i:05d}", "prompt": f"Prompt number {i}"} for i in range(n)]


def _splits(path: Path, **kw) -> dict[str, str]:
    kw.setdefault("reference_field", None)
    t = load_prompts(DataConfig(path=str(path), **kw))
    return dict(zip(t.column("prompt_id").to_pylist(), t.column("split").to_pylist()))


def test_split_stable_across_loads_and_row_order(tmp_path):
    rows = _synthetic(300)
    a = _splits(write_jsonl(tmp_path / "a.jsonl", rows), seed=7)
    b = _splits(write_jsonl(tmp_path / "a.jsonl", rows), seed=7)
    shuffled = list(rows)
    random.Random(1).shuffle(shuffled)
    assert [r["id"] for r in shuffled] != [r["id"] for r in rows]
    c = _splits(write_jsonl(tmp_path / "b.jsonl", shuffled), seed=7)
    assert a == b
    assert a == c
    # A different file format and a subset of rows keep each prompt's split too.
    d = _splits(write_csv(tmp_path / "c.csv", shuffled[:50]), seed=7)
    assert all(a[k] == v for k, v in d.items())


def test_different_seed_changes_some_assignments(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", _synthetic(300))
    a = _splits(path, seed=0)
    b = _splits(path, seed=1)
    assert a.keys() == b.keys()
    changed = sum(a[k] != b[k] for k in a)
    assert changed > 0
    # Not all either: both are ~70% train.
    assert changed < len(a)


@pytest.mark.parametrize("validation, test", [(0.1, 0.2), (0.25, 0.05), (0.0, 0.3)])
def test_split_shares(tmp_path, validation, test):
    path = write_jsonl(tmp_path / "a.jsonl", _synthetic(2000))
    splits = _splits(path, split={"validation": validation, "test": test})
    counts = Counter(splits.values())
    n = len(splits)
    assert n == 2000
    assert set(counts) <= {"train", "validation", "test"}
    assert abs(counts["validation"] / n - validation) <= 0.03
    assert abs(counts["test"] / n - test) <= 0.03
    assert abs(counts["train"] / n - (1 - validation - test)) <= 0.03
    if validation == 0.0:
        assert counts["validation"] == 0


def test_select_split(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", _synthetic(200))
    table = load_prompts(DataConfig(path=str(path), reference_field=None))
    splits = table.column("split").to_pylist()
    held = select_split(table, ("validation", "test"))
    assert held.num_rows == sum(s != "train" for s in splits)
    assert set(held.column("split").to_pylist()) <= {"validation", "test"}


def test_limit_is_a_seeded_sample_over_tasks_not_the_first_rows():
    """data.limit on the demo (sorted by task: the first 20 rows are all math) spreads over tasks."""
    cfg = load(demo_config_path()).data
    full = load_prompts(cfg)
    assert Counter(full.column("task").to_pylist()[:20]) == {"math": 20}  # what "first rows" gave
    limited = load_prompts(cfg.model_copy(update={"limit": 20}))
    assert Counter(limited.column("task").to_pylist()) == {t: 4 for t in TASKS}
    again = load_prompts(cfg.model_copy(update={"limit": 20}))
    assert limited.to_pylist() == again.to_pylist()
    other = load_prompts(cfg.model_copy(update={"limit": 20, "seed": 1}))
    assert other.column("prompt_id").to_pylist() != limited.column("prompt_id").to_pylist()
    # A sampled row keeps its id and split: the limit picks rows, it changes none.
    by_id = {r["prompt_id"]: r for r in full.to_pylist()}
    assert all(by_id[r["prompt_id"]] == r for r in limited.to_pylist())


def test_limit_still_checks_every_row(tmp_path):
    """Duplicate ids (and any bad row) are found across the whole file, not only in the sample."""
    rows = _synthetic(20) + [{"id": "item-00003", "prompt": "a different prompt"}]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    with pytest.raises(DataError, match=r"line 21: duplicate prompt id 'item-00003' \(first seen at line 4\)"):
        load_prompts(DataConfig(path=str(path), reference_field=None, limit=2))


def test_limit_above_row_count(tmp_path):
    rows = _synthetic(3)
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    t = load_prompts(DataConfig(path=str(path), reference_field=None, limit=10))
    assert t.num_rows == 3


# --- hashed ids --------------------------------------------------------------------------------

def test_ids_hashed_from_prompt_text(tmp_path):
    rows = [{"prompt": f"Question {i}?", "reference": str(i)} for i in range(10)]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    t1 = load_prompts(DataConfig(path=str(path)))
    t2 = load_prompts(DataConfig(path=str(path)))
    ids = t1.column("prompt_id").to_pylist()
    assert ids == t2.column("prompt_id").to_pylist()
    assert len(set(ids)) == len(ids)
    assert all(isinstance(i, str) and i for i in ids)
    by_prompt = {m[-1]["content"]: i for m, i in zip(t1.column("messages").to_pylist(), ids)}

    # Same prompts, reversed order and other references: each prompt keeps its id.
    other = [{"prompt": r["prompt"], "reference": "changed"} for r in reversed(rows)]
    t3 = load_prompts(DataConfig(path=str(write_jsonl(tmp_path / "b.jsonl", other))))
    for m, i in zip(t3.column("messages").to_pylist(), t3.column("prompt_id").to_pylist()):
        assert by_prompt[m[-1]["content"]] == i

    # id_field=null ignores an id column and hashes the prompt as well.
    with_ids = [dict(r, id=f"given-{n}") for n, r in enumerate(rows)]
    t4 = load_prompts(DataConfig(path=str(write_jsonl(tmp_path / "c.jsonl", with_ids)), id_field=None))
    assert t4.column("prompt_id").to_pylist() == ids


def test_empty_id_value_falls_back_to_hash(tmp_path):
    rows = [{"id": "", "prompt": "Hello there", "reference": "x"}]
    no_id = [{"prompt": "Hello there", "reference": "x"}]
    a = load_prompts(DataConfig(path=str(write_jsonl(tmp_path / "a.jsonl", rows))))
    b = load_prompts(DataConfig(path=str(write_jsonl(tmp_path / "b.jsonl", no_id))))
    assert a.column("prompt_id").to_pylist() == b.column("prompt_id").to_pylist()
    assert a.column("prompt_id")[0].as_py() != ""


# --- packaged demo set -------------------------------------------------------------------------

def test_demo_set():
    cfg = load(demo_config_path())
    table = load_prompts(cfg.data)
    schema.validate(table, schema.PROMPTS_SCHEMA, "demo")
    assert table.num_rows >= 200
    tasks = table.column("task").to_pylist()
    assert set(tasks) == set(TASKS)
    splits = Counter(table.column("split").to_pylist())
    assert splits["train"] > 0 and splits["validation"] > 0 and splits["test"] > 0
    math_refs = [r for t, r in zip(tasks, table.column("reference").to_pylist()) if t == "math"]
    assert math_refs
    for ref in math_refs:
        assert ref is not None
        assert extract_number(ref) is not None, ref


def test_template_with_indexed_field_fills(tmp_path):
    """`{meta[title]}` reads field `meta` (Python format semantics)."""
    from raydistill.config import DataConfig
    from raydistill.data import load_prompts

    p = tmp_path / "nested.jsonl"
    p.write_text('{"id": "a", "meta": {"title": "T"}}\n')
    cfg = DataConfig(path=str(p), prompt_template="Title: {meta[title]}", reference_field=None)
    assert load_prompts(cfg).column("messages")[0].as_py()[-1]["content"] == "Title: T"


def test_encoding_bom_and_long_csv_fields(tmp_path):
    """A Latin-1 file is a DataError naming the file; a UTF-8 BOM and a 200 KB cell are fine."""
    from raydistill.config import DataConfig
    from raydistill.data import DataError, load_prompts

    latin = tmp_path / "latin.csv"
    latin.write_bytes("prompt\ncaf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.csv: not UTF-8 text \(byte 0xe9"):
        load_prompts(DataConfig(path=str(latin)))
    bom = tmp_path / "bom.csv"
    bom.write_bytes("\ufeffprompt,answer\nhello,hi\n".encode("utf-8"))
    t = load_prompts(DataConfig(path=str(bom), reference_field="answer"))
    assert t.column("reference").to_pylist() == ["hi"]
    big = tmp_path / "big.csv"
    big.write_text("prompt\n" + "x" * 200_000 + "\n")
    assert len(load_prompts(DataConfig(path=str(big))).column("messages")[0].as_py()[0]["content"]) == 200_000


def test_template_field_empty_and_literal_brace_hint(tmp_path):
    from raydistill.config import DataConfig
    from raydistill.data import DataError, load_prompts

    p = tmp_path / "d.csv"
    p.write_text("dialogue\nA: hi\n\n\"\"\n")  # the blank line 3 is skipped; line 4 is an empty cell
    with pytest.raises(DataError, match=r"d\.csv: line 4: field 'dialogue' used by data.prompt_template is empty"):
        load_prompts(DataConfig(path=str(p), prompt_template="Summarize this dialogue:\n{dialogue}"))
    with pytest.raises(DataError, match=r"write \{\{ and \}\}"):
        load_prompts(DataConfig(path=str(p), prompt_template='Return JSON {"q": 1} for {dialogue}'))


def test_remote_and_folder_paths_are_clear_errors(tmp_path):
    from raydistill.config import DataConfig
    from raydistill.data import DataError, load_prompts

    with pytest.raises(DataError, match=r"an s3:// path is read by `raydistill generate`"):
        load_prompts(DataConfig(path="s3://bucket/p.jsonl"))
    with pytest.raises(DataError, match="is a folder"):
        load_prompts(DataConfig(path=str(tmp_path)))


# --- cell values: missing references, numbers, prompts that are not text ------------------------

def test_nan_reference_is_missing_not_the_text_nan(tmp_path):
    """JSON's bare NaN (Python writes it), null and parquet's NaN are no reference, never 'nan'."""
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"id": "a", "prompt": "2+2?", "reference": NaN}\n'
                     '{"id": "b", "prompt": "3+3?", "reference": null}\n'
                     '{"id": "c", "prompt": "4+4?", "reference": 8}\n')
    assert load_prompts(DataConfig(path=str(jsonl), task="math", reference_field="reference")
                        ).column("reference").to_pylist() == [None, None, "8"]
    doc = tmp_path / "p.json"
    doc.write_text('[{"id": "a", "prompt": "2+2?", "reference": NaN}, {"id": "b", "prompt": "x", "reference": 1}]')
    assert load_prompts(DataConfig(path=str(doc), reference_field="reference")
                        ).column("reference").to_pylist() == [None, "1"]
    # pandas writes a numeric column with a gap as float64 with NaN: 18.0 is "18", NaN is missing.
    pq_path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a?", "b?", "c?"], "answer": [18.0, float("nan"), 0.75]}), pq_path)
    assert load_prompts(DataConfig(path=str(pq_path), task="math", reference_field="answer")
                        ).column("reference").to_pylist() == ["18", None, "0.75"]


def test_number_references_read_as_their_natural_text(tmp_path):
    rows = [{"id": "a", "prompt": "p1", "reference": 18}, {"id": "b", "prompt": "p2", "reference": 18.0},
            {"id": "c", "prompt": "p3", "reference": 0.75}, {"id": "d", "prompt": "p4", "reference": -3},
            {"id": "e", "prompt": "p5", "reference": True}, {"id": "f", "prompt": "p6", "reference": 1e-05}]
    want = ["18", "18", "0.75", "-3", "true", "1e-05"]
    for suffix in (".jsonl", ".json"):
        path = WRITERS[suffix](tmp_path / f"n{suffix}", rows)
        assert load_prompts(DataConfig(path=str(path), reference_field="reference")
                            ).column("reference").to_pylist() == want, suffix
    # Integer NLI labels in parquet read as "0"/"2", the keys data.label_map uses.
    path = tmp_path / "nli.parquet"
    pq.write_table(pa.table({"prompt": ["p", "h"], "label": pa.array([0, 2], pa.int64())}), path)
    assert load_prompts(DataConfig(path=str(path), task="nli", reference_field="label")
                        ).column("reference").to_pylist() == ["0", "2"]


def test_infinite_and_list_references_are_errors(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "prompt": "x", "reference": "1"}\n{"id": "b", "prompt": "y", "reference": Infinity}\n')
    assert _load_error(path, task_field=None) == (
        f"{path}: line 2: reference field 'reference' is inf (JSON Infinity), not a usable value; "
        "write it as text, or null for none")
    path = write_jsonl(tmp_path / "q.jsonl", [{"id": "a", "prompt": "x", "answers": ["Paris", "paris"]}])
    msg = _load_error(path, task_field=None, reference_field="answers")
    assert msg.startswith(f"{path}: line 1: reference field 'answers' holds a list (['Paris', 'paris'])")


@pytest.mark.parametrize("raw, shown", [
    ("NaN", "is empty (NaN); every row needs a prompt"),
    ("null", "is empty (null); every row needs a prompt"),
    ("18", "is not text: 18 (int); a prompt must be a string"),
    ("[\"a\", \"b\"]", "is not text: ['a', 'b'] (list); a prompt must be a string"),
    ("{\"text\": \"hi\"}", "is not text: {'text': 'hi'} (dict); a prompt must be a string"),
])
def test_prompt_that_is_not_text_names_line_and_field(tmp_path, raw, shown):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "question": "fine"}\n{"id": "b", "question": %s}\n' % raw)
    assert _load_error(path, task_field=None, reference_field=None, prompt_field="question") == (
        f"{path}: line 2: field 'question' (named by data.prompt_field) {shown}")


def test_template_field_nan_is_empty_not_nan_text(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"doc": ["it rained", None], "n": [1.5, float("nan")]}), path)
    msg = _load_error(path, task_field=None, reference_field=None, prompt_template="{doc} ({n})")
    assert msg == f"{path}: row 2: field 'doc' used by data.prompt_template is empty (null)"
    msg = _load_error(path, task_field=None, reference_field=None, prompt_template="({n})")
    assert msg == f"{path}: row 2: field 'n' used by data.prompt_template is empty (NaN)"


def test_chat_messages_in_a_prompt_column_point_to_messages_field(tmp_path):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "how are you?"}]
    rows = [{"id": "a", "messages": chat}]
    for suffix in (".jsonl", ".parquet"):
        path = WRITERS[suffix](tmp_path / f"chat{suffix}", rows)
        msg = _load_error(path, task_field=None, reference_field=None, prompt_field="messages")
        where = "line 1" if suffix == ".jsonl" else "row 1"
        assert msg.startswith(f"{path}: {where}: field 'messages' (named by data.prompt_field) holds chat messages")
        assert msg.endswith("to send a chat history (the teacher writes the next assistant turn), set "
                            "data.messages_field=messages instead of a prompt column or template")
    # The default prompt_field with only a messages column: the missing-field error says the same.
    path = write_jsonl(tmp_path / "c2.jsonl", rows)
    msg = _load_error(path, task_field=None, reference_field=None)
    assert "field 'prompt' (named by data.prompt_field) is missing" in msg
    assert "field 'messages' holds chat messages: to send a chat history" in msg
    assert "set data.messages_field=messages" in msg
    # ShareGPT style ({from, value}) through a template too.
    path = write_jsonl(tmp_path / "c3.jsonl", [{"id": "a", "conversations": [{"from": "human", "value": "hi"}]}])
    msg = _load_error(path, task_field=None, reference_field=None, prompt_template="Chat: {conversations}")
    assert "line 1: field 'conversations' (named by data.prompt_template) holds chat messages" in msg
    assert "set data.messages_field=conversations" in msg
    # Followed, the hint works.
    t = load_prompts(DataConfig(path=str(path), messages_field="conversations", reference_field=None))
    assert t.column("messages").to_pylist() == [[{"role": "user", "content": "hi"}]]


def test_empty_task_value_is_named(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "prompt": "x", "task": "qa"}\n{"id": "b", "prompt": "y", "task": NaN}\n')
    assert _load_error(path, reference_field=None) == (
        f"{path}: line 2: task field 'task' is empty (nan); known task types: {', '.join(TASKS)}")


def test_ids_read_alike_across_formats_and_nan_id_is_hashed(tmp_path):
    """A parquet float id 7.0 is id "7", as in the CSV and JSON files, so the split agrees."""
    csv_path = tmp_path / "p.csv"
    csv_path.write_text("id,prompt\n7,Seven?\n8,Eight?\n")
    pq_path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"id": [7.0, float("nan")], "prompt": ["Seven?", "Eight?"]}), pq_path)
    a = load_prompts(DataConfig(path=str(csv_path)))
    b = load_prompts(DataConfig(path=str(pq_path)))
    no_id = load_prompts(DataConfig(path=str(write_jsonl(tmp_path / "e.jsonl", [{"prompt": "Eight?"}]))))
    assert a.column("prompt_id").to_pylist()[0] == b.column("prompt_id").to_pylist()[0] == "7"
    assert b.column("prompt_id").to_pylist()[1] == no_id.column("prompt_id").to_pylist()[0]
    assert a.column("split").to_pylist()[0] == b.column("split").to_pylist()[0]


# --- CSV cell counts -----------------------------------------------------------------------------

def test_csv_row_with_more_cells_than_header(tmp_path):
    """An unquoted comma used to cut the prompt silently (DictReader filed the rest under None)."""
    path = tmp_path / "math.csv"
    path.write_text("id,prompt,reference\n"
                    "m1,What is 2 + 2?,4\n"
                    "m2,A bike costs 1,000 dollars and a helmet 250. What do both cost?,1250\n")
    assert _load_error(path, task_field=None, task="math") == (
        f"{path}: line 3 has 4 cells, the header has 3 (id, prompt, reference); quote cells that contain commas")
    # Quoted, the same row reads whole.
    path.write_text('id,prompt,reference\nm2,"A bike costs 1,000 dollars and a helmet 250. What do both cost?",1250\n')
    t = load_prompts(cfg_for(path, task_field=None, task="math"))
    assert t.column("messages").to_pylist()[0][0]["content"] == (
        "A bike costs 1,000 dollars and a helmet 250. What do both cost?")
    assert t.column("reference").to_pylist() == ["1250"]


def test_csv_row_with_fewer_cells_than_header(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("id,prompt,reference\na,hello,hi\n\nb,world\n")
    assert _load_error(path, task_field=None) == (
        f"{path}: line 4 has 2 cells, the header has 3 (id, prompt, reference); every row needs a cell for "
        "each column (an empty cell is still a cell), and cells that contain commas or line breaks must be quoted")


def test_csv_line_numbers_count_quoted_line_breaks_and_name_the_start(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('id,prompt\na,"line one\nline two\nline three"\nb,next\n')
    t = load_prompts(DataConfig(path=str(path)))
    assert t.column("messages").to_pylist()[0][0]["content"] == "line one\nline two\nline three"
    path.write_text('id,prompt\na,"line one\nline two\nline three"\nb,next\na,again\n')
    assert _load_error(path, task_field=None, reference_field=None) == (
        f"{path}: line 6: duplicate prompt id 'a' (first seen at line 2)")


def test_csv_duplicate_header_column(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("id,prompt,prompt\na,x,y\n")
    assert _load_error(path, task_field=None, reference_field=None) == (
        f"{path}: line 1: the header names column 'prompt' twice (columns 2 and 3); column names must be unique")


# --- paths ---------------------------------------------------------------------------------------

def test_missing_relative_path_says_what_it_resolved_to(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    msg = _load_error(Path("../data/x.csv"))
    assert msg == (f"data file not found: ../data/x.csv (resolved against the current directory {cwd}: "
                   f"{tmp_path / 'data' / 'x.csv'})")
    assert _load_error(tmp_path / "nowhere.jsonl") == f"data file not found: {tmp_path / 'nowhere.jsonl'}"
    # A relative path that exists is read from the current directory.
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "x.jsonl", [{"id": "a", "prompt": "hi"}])
    assert load_prompts(DataConfig(path="../data/x.jsonl")).num_rows == 1


@pytest.mark.parametrize("remote", ["s3://bucket/runs/p.jsonl", "gs://b/p.parquet", "https://host/p.csv"])
def test_remote_path_printed_as_given(remote):
    with pytest.raises(DataError) as ei:
        load_prompts(DataConfig(path=remote))
    assert str(ei.value) == (f"data.path {remote}: an s3:// path is read by `raydistill generate` (Ray Data); "
                             "this reads local files only")


# --- sample_by_task ------------------------------------------------------------------------------

def _task_table(counts: dict[str, int], shuffle_seed: int | None = None) -> pa.Table:
    rows = [{"prompt_id": f"{t}-{i}", "split": "train", "task": t,
             "messages": [{"role": "user", "content": f"{t} {i}"}], "reference": None}
            for t, k in counts.items() for i in range(k)]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(rows)
    return pa.Table.from_pylist(rows, schema=schema.PROMPTS_SCHEMA)


def _counts(table: pa.Table) -> dict[str, int]:
    return dict(Counter(table.column("task").to_pylist()))


def test_sample_by_task_proportional_quotas():
    table = _task_table({"math": 60, "nli": 30, "qa": 10})
    assert _counts(sample_by_task(table, 10, 0)) == {"math": 6, "nli": 3, "qa": 1}
    # Largest remainders: 7 × (0.6, 0.3, 0.1) = 4.2, 2.1, 0.7 -> 4, 2, 1.
    assert _counts(sample_by_task(table, 7, 0)) == {"math": 4, "nli": 2, "qa": 1}


def test_sample_by_task_at_least_one_per_task():
    table = _task_table({"math": 90, "nli": 5, "qa": 5})
    # 5 × (0.9, 0.05, 0.05) = 4.5, 0.25, 0.25: each small task still gets one, math gives way.
    assert _counts(sample_by_task(table, 5, 0)) == {"math": 3, "nli": 1, "qa": 1}
    assert _counts(sample_by_task(table, 3, 0)) == {"math": 1, "nli": 1, "qa": 1}
    # Fewer rows than tasks: the largest tasks first.
    assert _counts(sample_by_task(table, 1, 0)) == {"math": 1}


def test_sample_by_task_quotas_hold_for_many_shapes():
    rng = random.Random(0)
    for _ in range(300):
        counts = {f"t{j}": rng.randint(1, 40) for j in range(rng.randint(1, 6))}
        total = sum(counts.values())
        n = rng.randint(1, total)
        got = _counts(sample_by_task(_task_table(counts), n, rng.randint(0, 9)))
        assert sum(got.values()) == n, (counts, n, got)
        assert all(got.get(t, 0) <= k for t, k in counts.items())
        if n >= len(counts):
            assert set(got) == set(counts), (counts, n, got)
        if all(n * k / total >= 1 for k in counts.values()):  # no floor needed: within one of the share
            assert all(abs(got[t] - n * k / total) < 1 for t, k in counts.items()), (counts, n, got)


def test_sample_by_task_seeded_ordered_and_independent_of_row_order():
    table = _task_table({"math": 40, "nli": 40, "qa": 20})
    a = sample_by_task(table, 10, 3)
    assert a.to_pylist() == sample_by_task(table, 10, 3).to_pylist()
    assert a.column("prompt_id").to_pylist() != sample_by_task(table, 10, 4).column("prompt_id").to_pylist()
    def positions(sample: pa.Table, source: pa.Table) -> list[int]:
        where = {pid: i for i, pid in enumerate(source.column("prompt_id").to_pylist())}
        return [where[p] for p in sample.column("prompt_id").to_pylist()]

    assert positions(a, table) == sorted(positions(a, table))
    shuffled = _task_table({"math": 40, "nli": 40, "qa": 20}, shuffle_seed=1)
    b = sample_by_task(shuffled, 10, 3)
    assert set(b.column("prompt_id").to_pylist()) == set(a.column("prompt_id").to_pylist())
    assert positions(b, shuffled) == sorted(positions(b, shuffled))
    assert sample_by_task(table, 100, 0) is table
    assert sample_by_task(table, 500, 0) is table


# --- make_prompts: batches of records (the streaming job's per-batch step) -----------------------

def test_make_prompts_matches_load_prompts_and_pickles(tmp_path):
    import pickle

    from raydistill.config import TaskPromptsConfig
    from raydistill.data import make_prompts

    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    cfg, tp = cfg_for(path), TaskPromptsConfig()
    # Plain records (no __where__), as Ray Data gives them, make the rows load_prompts makes.
    batch = make_prompts([dict(r) for r in ROWS], cfg, tp, "s3://b/p.jsonl")
    assert batch.schema.equals(schema.PROMPTS_SCHEMA)
    assert batch.to_pylist() == load_prompts(cfg, tp).to_pylist()
    # Picklable: the function and its arguments go to Ray workers.
    fn, cfg2, tp2 = pickle.loads(pickle.dumps((make_prompts, cfg, tp)))
    assert fn([dict(r) for r in ROWS], cfg2, tp2, "x").to_pylist() == batch.to_pylist()
    empty = make_prompts([], cfg, tp, "x")
    assert empty.num_rows == 0 and empty.schema.equals(schema.PROMPTS_SCHEMA)


def test_make_prompts_errors_name_the_file_and_the_row_id():
    from raydistill.data import make_prompts

    cfg = DataConfig(task_field="task", reference_field="reference")
    src = "s3://bucket/prompts/part-00003.parquet"

    def err(records):
        with pytest.raises(DataError) as ei:
            make_prompts(records, cfg, None, src)
        return str(ei.value)

    rows = [dict(r) for r in ROWS]
    rows[2]["task"] = "poetry"
    assert err(rows) == f"{src}: row id 'c3': unknown task type 'poetry'; known: {', '.join(TASKS)}"
    rows = [dict(ROWS[0]), {"prompt": 18, "task": "qa", "reference": None}]
    assert err(rows) == (f"{src}: batch row 2 (no id): field 'prompt' (named by data.prompt_field) is not text: "
                         "18 (int); a prompt must be a string")
    rows = [dict(r) for r in ROWS] + [dict(ROWS[1], prompt="other")]
    assert err(rows) == f"{src}: row id 'b2': duplicate prompt id 'b2' (first seen at batch row 2)"
    rows = [{"prompt": "same", "task": "qa", "reference": None}] * 2
    assert err(rows).startswith(f"{src}: batch row 2 (no id): duplicate prompt id ")
    assert err(rows).endswith("(first seen at batch row 1); ids without an id value are hashed from the "
                              "prompt text, so this prompt text repeats")
    # A record's own __where__ / __source__ win (line-exact errors; rows of several shards).
    rows = [dict(ROWS[0], __where__="line 7", __source__="data/a.jsonl"), dict(ROWS[1], task=None)]
    assert err(rows[:1] + [dict(rows[1], __where__="line 2")]) == (
        f"{src}: line 2: task field 'task' is empty (None); known task types: {', '.join(TASKS)}")
    rows = [dict(ROWS[0], __where__="line 7", __source__="data/a.jsonl"),
            dict(ROWS[1], id="a1", __where__="line 1", __source__="data/b.jsonl")]
    assert err(rows) == "data/b.jsonl: line 1: duplicate prompt id 'a1' (first seen at data/a.jsonl: line 7)"
    # A bad id names the row by its place in the batch.
    assert err([dict(ROWS[0], id=float("inf"))]) == (
        f"{src}: batch row 1 (no id): id field 'id' is inf (JSON Infinity), not a usable value; write it as "
        "text, or null for none")


def test_make_prompts_reads_numpy_and_pyarrow_values():
    """Ray Data batches may hold numpy scalars/arrays and pyarrow scalars where files gave Python values."""
    import numpy as np

    from raydistill.data import make_prompts

    chat = np.array([{"role": "user", "content": np.str_("hi")}, {"role": "assistant", "content": "hello"},
                     {"role": "user", "content": "and?"}], dtype=object)
    records = [
        {"id": np.int64(7), "prompt": np.str_("What is 2 + 3?"), "task": np.str_("math"),
         "reference": np.float64(18.0)},
        {"id": pa.scalar("q"), "prompt": pa.scalar("Capital?"), "task": "qa", "reference": np.float64("nan")},
    ]
    got = make_prompts(records, DataConfig(task_field="task", reference_field="reference"), None, "f")
    assert got.to_pylist() == make_prompts(
        [{"id": 7, "prompt": "What is 2 + 3?", "task": "math", "reference": 18.0},
         {"id": "q", "prompt": "Capital?", "task": "qa", "reference": None}],
        DataConfig(task_field="task", reference_field="reference"), None, "f").to_pylist()
    assert got.column("reference").to_pylist() == ["18", None]
    conv = make_prompts([{"id": np.str_("c"), "chat": chat}], DataConfig(messages_field="chat"), None, "f")
    assert conv.column("messages").to_pylist() == [[{"role": "user", "content": "hi"},
                                                    {"role": "assistant", "content": "hello"},
                                                    {"role": "user", "content": "and?"}]]
    # A chat history arriving as a numpy array in a prompt column still points to data.messages_field.
    with pytest.raises(DataError, match="set data.messages_field=chat"):
        make_prompts([{"id": "c", "chat": chat}], DataConfig(prompt_field="chat"), None, "f")


def test_make_prompts_in_ray_data_map_batches(tmp_path, ray_local):
    """The lead's path: Ray Data reads the file, map_batches calls make_prompts on each batch."""
    import ray

    from raydistill.config import TaskPromptsConfig
    from raydistill.data import make_prompts

    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "how are you?"}]
    rows = [{"id": f"r{i}", "task": "conversation", "chat": chat[: 1 + 2 * (i % 2)]} for i in range(6)]
    jsonl = write_jsonl(tmp_path / "c.jsonl", rows)
    pq_path = write_parquet(tmp_path / "c.parquet", rows)
    cfg = DataConfig(path=str(jsonl), messages_field="chat", reference_field=None)
    tp = TaskPromptsConfig(conversation="Be kind.")
    want = load_prompts(cfg, tp).to_pylist()

    def to_prompts(batch: pa.Table) -> pa.Table:
        return make_prompts(batch.to_pylist(), cfg, tp, str(jsonl))

    def to_prompts_pandas(df):  # pandas batches hold the list column as numpy arrays of dicts
        return make_prompts(df.to_dict("records"), cfg, tp, str(pq_path))

    for ds, fn, fmt in ((ray.data.read_json(str(jsonl)), to_prompts, "pyarrow"),
                        (ray.data.read_parquet(str(pq_path)), to_prompts, "pyarrow"),
                        (ray.data.read_parquet(str(pq_path)), to_prompts_pandas, "pandas")):
        got = ds.map_batches(fn, batch_format=fmt, batch_size=4).take_all()
        got = sorted(({k: r[k] for k in ("prompt_id", "split", "task", "messages", "reference")} for r in got),
                     key=lambda r: r["prompt_id"])
        got = pa.Table.from_pylist(got, schema=schema.PROMPTS_SCHEMA).to_pylist()
        assert got == sorted(want, key=lambda r: r["prompt_id"]), fmt


# --- data.messages_field: conversations ---------------------------------------------------------

CHAT = [{"role": "system", "content": "You are a support agent."},
        {"role": "user", "content": "My order is late."},
        {"role": "assistant", "content": "Sorry! What is the order number?"},
        {"role": "user", "content": "A-1234."}]
SHAREGPT = [{"from": {"role": "from"}.get(m["role"], {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"])),
             "value": m["content"]} for m in CHAT]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_messages_field_openai_and_sharegpt(tmp_path, suffix):
    rows = [{"id": "o1", "chat": CHAT}, {"id": "o2", "chat": CHAT[1:2]}]
    path = WRITERS[suffix](tmp_path / f"chat{suffix}", rows)
    cfg = DataConfig(path=str(path), messages_field="chat", reference_field=None)
    t = load_prompts(cfg)
    assert t.column("task").to_pylist() == ["conversation", "conversation"]
    assert t.column("messages").to_pylist() == [CHAT, CHAT[1:2]]
    assert t.column("prompt_id").to_pylist() == ["o1", "o2"]
    # ShareGPT {from, value}: human → user, gpt → assistant; the same messages.
    share = WRITERS[suffix](tmp_path / f"share{suffix}", [{"id": "o1", "conversations": SHAREGPT}])
    s = load_prompts(DataConfig(path=str(share), messages_field="conversations", reference_field=None))
    assert SHAREGPT[1] == {"from": "human", "value": "My order is late."}
    assert s.column("messages").to_pylist() == [CHAT]


def test_messages_field_hashed_ids_use_the_whole_history(tmp_path):
    from raydistill.data import make_prompts

    cfg = DataConfig(messages_field="chat", reference_field=None)

    def ids(histories):
        return make_prompts([{"chat": h} for h in histories], cfg, None, "f").column("prompt_id").to_pylist()

    later = CHAT[:3] + [{"role": "user", "content": "B-999."}]
    a = ids([CHAT, later, CHAT[1:]])
    assert len(set(a)) == 3  # the same last turn after different histories, or without the system turn
    assert ids([SHAREGPT]) == a[:1]  # the style does not change the id
    # One user turn hashes like the same text in a prompt column (same id, same split).
    one = ids([CHAT[1:2]])
    plain = make_prompts([{"prompt": CHAT[1]["content"]}], DataConfig(reference_field=None), None, "f")
    assert one == plain.column("prompt_id").to_pylist()
    with pytest.raises(DataError, match=r"batch row 2 \(no id\): duplicate prompt id .* hashed from the history, "
                                        r"so this history repeats"):
        ids([CHAT, SHAREGPT])


def test_messages_field_json_text_in_csv(tmp_path):
    path = tmp_path / "c.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "chat"])
        w.writerow(["c1", json.dumps(CHAT)])
        w.writerow(["c2", "[{\"role\": \"user\""])
    with pytest.raises(DataError) as ei:
        load_prompts(DataConfig(path=str(path), messages_field="chat", reference_field=None))
    assert str(ei.value).startswith(f"{path}: line 3: field 'chat' (named by data.messages_field) is text that is "
                                    "not a JSON list of messages: ")
    path.write_text(path.read_text().splitlines()[0] + "\n" + path.read_text().splitlines()[1] + "\n")
    t = load_prompts(DataConfig(path=str(path), messages_field="chat", reference_field=None))
    assert t.column("messages").to_pylist() == [CHAT]


_NAMED = "field 'chat' (named by data.messages_field)"


@pytest.mark.parametrize("chat, error", [
    ("hello", f"{_NAMED} is not a list of chat messages: hello (str); give a list of {{role, content}} "
              "(or ShareGPT {from, value}) objects"),
    (None, f"{_NAMED} is not a list of chat messages: null (NoneType); give a list of {{role, content}} "
           "(or ShareGPT {from, value}) objects"),
    ({"role": "user", "content": "hi"}, f"{_NAMED} is not a list of chat messages: {{'role': 'user', 'content': "
                                        "'hi'} (dict); give a list of {role, content} (or ShareGPT {from, value}) "
                                        "objects"),
    ([], f"{_NAMED} is an empty list; a conversation needs at least one user message"),
    (["hi"], f"{_NAMED}, message 1 is not an object: hi (str); give {{role, content}} (or ShareGPT {{from, value}})"),
    ([{"content": "hi"}], f"{_NAMED}, message 1 has no role: {{'content': 'hi'}}; give {{role, content}} "
                          "(or ShareGPT {from, value})"),
    ([{"role": "user"}], f"{_NAMED}, message 1 (user) has no content: {{'role': 'user'}}"),
    ([{"from": "human"}], f"{_NAMED}, message 1 (human) has no value: {{'from': 'human'}}"),
    ([{"role": "user", "content": "  "}], f"{_NAMED}, message 1 (user): content is empty ('  ')"),
    ([{"role": "user", "content": ["a"]}], f"{_NAMED}, message 1 (user): content is not text: ['a'] (list)"),
    ([{"role": "tool", "content": "x"}], f"{_NAMED}, message 1 has unknown role 'tool'; known: system, user, "
                                         "assistant (ShareGPT: human, gpt, system)"),
    ([{"from": "bot", "value": "x"}], f"{_NAMED}, message 1 has unknown role 'bot'; known: system, user, "
                                      "assistant (ShareGPT: human, gpt, system)"),
    (CHAT[1:3], f"{_NAMED} ends with an assistant turn (message 2): nothing for the teacher to answer; end the "
                "history with the user turn to be answered"),
    (CHAT[:1], f"{_NAMED} holds only a system message; add the user turn to be answered"),
    (CHAT[1:2] + CHAT[:1] + CHAT[1:2], f"{_NAMED}, message 2 is a system message; only the first message may "
                                       "be one"),
])
def test_messages_field_errors_name_the_row_and_message(tmp_path, chat, error):
    path = write_jsonl(tmp_path / "c.jsonl", [{"id": "ok", "chat": CHAT}, {"id": "bad", "chat": chat}])
    with pytest.raises(DataError) as ei:
        load_prompts(DataConfig(path=str(path), messages_field="chat", reference_field=None))
    assert str(ei.value) == f"{path}: line 2: {error}"


def test_messages_field_missing_and_template_conflict(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "prompt": "hi"}])
    with pytest.raises(DataError) as ei:
        load_prompts(DataConfig(path=str(path), messages_field="chat", reference_field=None))
    assert str(ei.value) == (f"{path}: line 1: field 'chat' (named by data.messages_field) is missing; "
                             "row has ['id', 'prompt']")
    from raydistill.config import ConfigError

    with pytest.raises(ConfigError, match=r"data.messages_field \('chat'\) and data.prompt_template \('Q: \{q\}'\) "
                                          r"are both set"):
        load(None, ["data.messages_field=chat", "data.prompt_template=Q: {q}"])


# --- task system prompts -------------------------------------------------------------------------

def test_task_system_prompts_per_task_with_marker_and_budget(tmp_path):
    from raydistill.config import TASK_SYSTEM_PROMPTS, TaskPromptsConfig

    path = write_jsonl(tmp_path / "p.jsonl", ROWS + [{"id": "e5", "task": "conversation", "prompt": "Hi!",
                                                      "reference": None}])
    t = load_prompts(cfg_for(path), TaskPromptsConfig())
    msgs = dict(zip(t.column("task").to_pylist(), t.column("messages").to_pylist()))
    assert msgs["math"][0] == {"role": "system", "content": TASK_SYSTEM_PROMPTS["math"].replace("{marker}", "####")}
    assert "'#### <number>'" in msgs["math"][0]["content"]
    assert "'#### <answer>'" in msgs["qa"][0]["content"]
    assert msgs["nli"][0] == {"role": "system", "content": TASK_SYSTEM_PROMPTS["nli"]}
    assert msgs["summarization"][0]["content"] == "Summarize the text in at most 60 words."
    assert msgs["conversation"] == [{"role": "user", "content": "Hi!"}]  # no default prompt for chat
    for row, m in zip(ROWS, t.column("messages").to_pylist()):
        assert m[1:] == [{"role": "user", "content": row["prompt"]}]
    # Marker and budget come from the config; a task prompt can be replaced or switched off.
    tp = TaskPromptsConfig(final_answer_marker="ANSWER:", summary_max_words=25, qa=None,
                           conversation="Be kind; at most {max_words} words.")
    msgs = dict(zip(*(load_prompts(cfg_for(path), tp).column(c).to_pylist() for c in ("task", "messages"))))
    assert msgs["math"][0]["content"].endswith("as 'ANSWER: <number>'.")
    assert msgs["summarization"][0]["content"] == "Summarize the text in at most 25 words."
    assert msgs["qa"] == [{"role": "user", "content": "Capital of France?"}]
    assert msgs["conversation"][0] == {"role": "system", "content": "Be kind; at most 25 words."}
    # enabled: false turns them all off (data.system_prompt still applies).
    off = load_prompts(cfg_for(path), TaskPromptsConfig(enabled=False)).column("messages").to_pylist()
    assert all(len(m) == 1 and m[0]["role"] == "user" for m in off)
    off = load_prompts(cfg_for(path, system_prompt="Terse."), TaskPromptsConfig(enabled=False))
    assert all(m[0] == {"role": "system", "content": "Terse."} for m in off.column("messages").to_pylist())


def test_data_system_prompt_replaces_task_prompts_and_a_history_keeps_its_own(tmp_path):
    from raydistill.config import TaskPromptsConfig
    from raydistill.data import make_prompts

    t = load_prompts(cfg_for(write_jsonl(tmp_path / "p.jsonl", ROWS), system_prompt="You are terse."),
                     TaskPromptsConfig())
    for msgs, row in zip(t.column("messages").to_pylist(), ROWS):
        assert msgs == [{"role": "system", "content": "You are terse."}, {"role": "user", "content": row["prompt"]}]
    records = [{"id": "own", "chat": CHAT}, {"id": "none", "chat": CHAT[1:]}]
    tp = TaskPromptsConfig(conversation="Default chat prompt.")
    for system_prompt, added in ((None, "Default chat prompt."), ("Override.", "Override.")):
        cfg = DataConfig(messages_field="chat", reference_field=None, system_prompt=system_prompt)
        own, none = make_prompts(records, cfg, tp, "f").column("messages").to_pylist()
        assert own == CHAT  # its own system message stays, nothing added
        assert none == [{"role": "system", "content": added}] + CHAT[1:]


@pytest.mark.parametrize("text, problem", [
    ("Answer, then {answer}.", "uses {answer}; only {marker} and {max_words} are filled in (write {{ and }} "
                               "for literal braces)"),
    ("Reply in JSON {\"a\": 1}", "uses {\"a\"}; only {marker} and {max_words} are filled in"),
    ("Use {} here", "uses {}; only {marker} and {max_words} are filled in"),
    ("End with {marker", "is not a valid template (expected '}' before end of string); write {{ and }} for "
                         "literal braces"),
    ("At most {max_words:q} words", "cannot be filled: Unknown format code 'q'"),
])
def test_task_prompt_with_unknown_placeholder_refused_at_config_load(tmp_path, text, problem):
    from raydistill.config import ConfigError

    with pytest.raises(ConfigError) as ei:
        load(None, [f"task_prompts.summarization={text}"])
    assert f"task_prompts.summarization ({text!r}) {problem}" in str(ei.value)
    f = tmp_path / "c.yaml"
    f.write_text(yaml_dump({"task_prompts": {"math": text}}))
    with pytest.raises(ConfigError, match=r"task_prompts\.math \("):
        load(f)


def test_task_prompt_literal_braces_and_null_are_fine():
    cfg = load(None, ["task_prompts.nli=Answer as {{\"label\": ...}} within {max_words} words",
                      "task_prompts.math=null"])
    prompts = cfg.task_prompts.system_prompts()
    assert prompts["nli"] == "Answer as {\"label\": ...} within 60 words"
    assert "math" not in prompts and "conversation" not in prompts


def yaml_dump(obj) -> str:
    import yaml

    return yaml.safe_dump(obj)
