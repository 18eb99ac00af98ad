"""The split: identical prompts and data.group_field groups share one split; evaluate refuses test
prompts whose id or messages are train rows (unit tests, no Ray)."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydistill.config import DataConfig
from raydistill.corpus import write_prompts
from raydistill.data import DataError, make_prompts, split_key, split_of
from raydistill.evaluate.prompts import check_unseen
from raydistill.schema import CORPUS_SCHEMA, PROMPTS_SCHEMA, SCHEMA_VERSION, SchemaError, conform


def _data(**over) -> DataConfig:
    return DataConfig(prompt_field="q", id_field="id", task="qa", **over)


def _splits(table: pa.Table) -> dict[str, str]:
    return dict(zip(table.column("prompt_id").to_pylist(), table.column("split").to_pylist()))


def test_identical_prompts_under_other_ids_share_a_split():
    """The split used to hash the id: the same question under two ids landed in train and test."""
    rows = []
    for i in range(200):
        rows.append({"id": f"a{i}", "q": f"What is {i} plus {i}?"})
        rows.append({"id": f"b{i}", "q": f"  what IS {i}  plus {i}?\n"})  # case and spaces differ
    got = _splits(make_prompts(rows, _data(), None, "p.jsonl"))
    assert all(got[f"a{i}"] == got[f"b{i}"] for i in range(200))
    assert set(got.values()) == {"train", "validation", "test"}  # still a split, not one bucket
    # the id no longer decides: the split of a prompt is that of its messages' key
    assert got["a7"] == split_of(split_key([{"role": "user", "content": "What is 7 plus 7?"}]), 0, 0.1, 0.2)


def test_group_field_keeps_a_conversations_turns_in_one_split():
    rows = [{"id": f"c{c}t{t}", "conv": f"c{c}", "messages": [{"role": "user", "content": f"turn {t} of {c}"}]}
            for c in range(60) for t in range(3)]
    data = DataConfig(messages_field="messages", id_field="id", task="conversation", group_field="conv")
    got = _splits(make_prompts(rows, data, None, "chats.jsonl"))
    for c in range(60):
        assert len({got[f"c{c}t{t}"] for t in range(3)}) == 1, c
    assert {"train", "test"} <= set(got.values())
    # without the group the turns scatter over the splits
    loose = _splits(make_prompts(rows, DataConfig(messages_field="messages", id_field="id", task="conversation"),
                                 None, "chats.jsonl"))
    assert any(len({loose[f"c{c}t{t}"] for t in range(3)}) > 1 for c in range(60))


def test_group_field_missing_or_blank():
    with pytest.raises(DataError, match=r"p.jsonl: line 2: group field 'conv' \(named by data.group_field\) is missing"):
        make_prompts([{"id": "a", "q": "x", "conv": "g", "__where__": "line 1"},
                      {"id": "b", "q": "y", "__where__": "line 2"}], _data(group_field="conv"), None, "p.jsonl")
    # a blank group splits by the messages, like a row without groups
    t = make_prompts([{"id": "a", "q": "Same question", "conv": " "}], _data(group_field="conv"), None, "p.jsonl")
    assert t.column("split")[0].as_py() == split_of(split_key([{"role": "user", "content": "Same question"}]),
                                                    0, 0.1, 0.2)


def _corpus(tmp_path: Path, prompts: pa.Table) -> Path:
    """A finished corpus: prompts/ as given, data/ = its train rows answered, manifest."""
    corpus = tmp_path / "corpus"
    (corpus / "data").mkdir(parents=True)
    write_prompts(corpus, prompts)
    rows = [dict(p, response="ok", response_token_ids=[], finish_reason="stop", prompt_tokens=1, response_tokens=1,
                 latency_s=0.1, batch_id="b", error=None, teacher="t", generation_params="{}")
            for p in prompts.to_pylist() if p["split"] == "train"]
    pq.write_table(conform(pa.Table.from_pylist(rows), CORPUS_SCHEMA), corpus / "data" / "part-00000.parquet")
    (corpus / "manifest.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION, "rows": len(rows),
                                                      "shards": ["data/part-00000.parquet"]}))
    return corpus


def _prompt(pid: str, split: str, text: str, system: str = "Answer.") -> dict:
    return {"prompt_id": pid, "split": split, "task": "qa", "reference": None,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": text}]}


def test_evaluate_refuses_test_prompts_whose_messages_are_train_rows(tmp_path):
    """A corpus split by id (the old rule) holds the same question in train and test under two ids."""
    rows = [_prompt(f"tr{i}", "train", f"Question {i}?") for i in range(6)]
    rows += [_prompt("te1", "test", "question 1?", system="Another task prompt"),  # same question, other case
             _prompt("te2", "test", "Question 2?"), _prompt("te9", "test", "Question 9?")]
    prompts = pa.Table.from_pylist(rows, schema=PROMPTS_SCHEMA)
    corpus = _corpus(tmp_path, prompts)
    test = prompts.filter(pa.compute.equal(prompts.column("split"), "test"))
    with pytest.raises(SchemaError) as err:
        check_unseen(corpus, test, "test")
    msg = str(err.value)
    assert "2 of the 3 test prompt(s)" in msg and "were trained on" in msg
    assert "2 have the same messages as 2 train row(s) under other ids (test te1 = train tr1, test te2 = train tr2)" in msg
    assert "te9" not in msg and "--overwrite" in msg
    check_unseen(corpus, test.slice(2), "test")  # te9 alone was never trained on


def test_check_unseen_pushes_the_split_filter_into_the_reader(tmp_path, monkeypatch):
    """The driver streams the train rows' ids and messages with the split filter in the parquet scan."""
    import pyarrow.dataset as pads

    rows = [_prompt(f"tr{i}", "train", f"Q{i}") for i in range(4)] + [_prompt("te", "test", "Q9")]
    prompts = pa.Table.from_pylist(rows, schema=PROMPTS_SCHEMA)
    corpus = _corpus(tmp_path, prompts)
    seen = []
    real = pads.dataset

    class Spy:
        def __init__(self, *args, **kwargs):
            self.ds = real(*args, **kwargs)

        def to_batches(self, **kwargs):
            seen.append(kwargs)
            return self.ds.to_batches(**kwargs)

    monkeypatch.setattr(pads, "dataset", Spy)
    check_unseen(corpus, prompts.slice(4), "test")
    assert len(seen) == 1 and seen[0]["columns"] == ["prompt_id", "messages"]
    assert str(seen[0]["filter"]) == str(pa.compute.field("split") == "train")


def test_read_prompts_reads_only_the_asked_split(tmp_path, monkeypatch):
    """Evaluate and bench-serve read one split: the filter goes into the parquet scan, the other splits
    are scanned for ids only, and the rows equal the whole table filtered afterwards."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from raydistill.corpus import read_prompts

    rows = [_prompt(f"p{i}", ("train", "validation", "test")[i % 3], f"Q{i}") for i in range(30)]
    prompts = pa.Table.from_pylist(rows, schema=PROMPTS_SCHEMA)
    corpus = _corpus(tmp_path, prompts)
    whole = pq.read_table(corpus / "prompts").select(PROMPTS_SCHEMA.names).cast(PROMPTS_SCHEMA)
    scans = []
    real = pads.dataset

    class Spy:
        def __init__(self, *args, **kwargs):
            self.ds = real(*args, **kwargs)
            self.schema = self.ds.schema

        def to_table(self, **kwargs):
            scans.append(("rows", kwargs))
            return self.ds.to_table(**kwargs)

        def to_batches(self, **kwargs):
            scans.append(("ids", kwargs))
            return self.ds.to_batches(**kwargs)

    monkeypatch.setattr(pads, "dataset", Spy)
    test = read_prompts(corpus, ("test",))
    assert test.equals(whole.filter(pc.equal(whole.column("split"), "test")))
    assert test.num_rows == 10
    (kind, rows_scan), (kind2, ids_scan) = scans
    assert (kind, kind2) == ("rows", "ids")
    assert str(rows_scan["filter"]) == str(pc.field("split").isin(["test"]))
    assert ids_scan["columns"] == ["prompt_id", "split"] and str(ids_scan["filter"]) == str(~rows_scan["filter"])
    # an id in test and in train is still refused
    clash = pa.Table.from_pylist(rows + [_prompt("p2", "train", "other")], schema=PROMPTS_SCHEMA)
    write_prompts(tmp_path / "c2", clash)
    (tmp_path / "c2" / "manifest.json").write_text((corpus / "manifest.json").read_text())
    with pytest.raises(SchemaError, match=r"1 prompt id\(s\) appear in two splits.*p2 \(test and train\)"):
        read_prompts(tmp_path / "c2", ("test",))
