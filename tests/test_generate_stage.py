"""The streaming generate stage end to end on a tiny model (hf engine): resume after SIGKILL
exactly once, S3 in and out against a real S3 server, reruns, changed settings, error share."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from .conftest import make_bucket, write_jsonl


def _prompts(n: int, start: int = 0) -> list[dict]:
    return [{"qid": f"q{i:05d}", "question": f"Tell me fact number {i} about Paris."} for i in range(start, start + n)]


def _config(tmp_path: Path, model: Path, data: str, output_dir: str, **extra) -> Path:
    cfg = {
        "output_dir": output_dir,
        "data": {"path": data, "prompt_field": "question", "id_field": "qid", "split": {"validation": 0.1, "test": 0.2}},
        "teacher": {"model": str(model), "engine": "hf", "batch_size": 4, "max_model_len": 128},
        "generation": {"max_new_tokens": 8},
        "filter": {"empty": False},  # a random model may answer with the stop token alone
    }
    for key, value in extra.items():
        cfg.setdefault(key, {}).update(value) if isinstance(value, dict) else cfg.update({key: value})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _expected_ids(rows: list[dict], seed: int = 0) -> set[str]:
    return {r["qid"] for r in rows if _split(r, seed) != "test"}


def _all_answer_ids(corpus) -> list[str]:
    """Prompt ids of every answer in the finished corpus: kept rows and rejects."""
    from raydistill.corpus import location, read_manifest

    loc = location(corpus)
    info = read_manifest(loc)
    ids: list[str] = []
    for shard in info["shards"] + info["reject_shards"]:
        ids += pq.read_table((loc / shard).path, filesystem=loc.fs, columns=["prompt_id"]).column("prompt_id").to_pylist()
    return ids


def _committed(corpus: Path) -> int:
    folder = corpus / "_checkpoint"
    return len([p for p in folder.glob("*.parquet") if not p.name.endswith(".pending.parquet")]) if folder.is_dir() else 0


@pytest.mark.slow
def test_generation_killed_part_way_resumes_with_every_prompt_exactly_once(tiny_model, tmp_path, ray_local):
    """SIGKILL of `raydistill generate` after some shards are committed; the rerun answers only
    the rest: every train/validation prompt id appears exactly once, and the manifest says how
    many rows each run added."""
    from raydistill.config import load
    from raydistill.generate import run_generate

    rows = _prompts(400)
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    cfg_file = _config(tmp_path, tiny_model, str(data), str(tmp_path / "run"),
                       generation={"max_new_tokens": 24, "rows_per_file": 8})  # commits every 2 engine batches
    corpus = tmp_path / "run" / "corpus"
    env = dict(os.environ, RAY_ADDRESS="")  # its own private Ray, not the test session's
    proc = subprocess.Popen([sys.executable, "-m", "raydistill.cli", "generate", str(cfg_file)], env=env,
                            stdout=subprocess.DEVNULL, stderr=(tmp_path / "run1.log").open("w"), start_new_session=True)
    deadline = time.time() + 300
    try:
        while _committed(corpus) < 3:
            assert proc.poll() is None, f"generate ended before it was killed:\n{(tmp_path / 'run1.log').read_text()[-3000:]}"
            assert time.time() < deadline, "no shard committed within 300 s"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)  # the driver, as a preempted node would lose it
        proc.wait(timeout=60)
    finally:
        time.sleep(3)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # Ray processes the driver started, if any remain
        except ProcessLookupError:
            pass
    assert not (corpus / "manifest.json").exists()
    written_before = _committed(corpus)
    assert written_before >= 3

    manifest = run_generate(load(cfg_file))
    ids = _all_answer_ids(corpus)
    assert len(ids) == len(set(ids)), "a prompt was answered twice"
    assert set(ids) == _expected_ids(rows), "a prompt was lost"
    assert manifest["rows_generated"] == len(ids)
    added = [r["rows_added"] for r in manifest["runs"]]
    assert len(added) == 2 and added[0] > 0 and added[1] > 0 and sum(added) == len(ids)
    assert not (corpus / "generated").exists() and not (corpus / "_checkpoint").exists()


@pytest.mark.slow  # three generate runs (about 10 min on a loaded 2-core machine); the pipeline tests rerun a finished generate by default
def test_rerun_keeps_a_finished_corpus_and_overwrite_starts_again(tiny_model, tmp_path, ray_local):
    from raydistill.config import load
    from raydistill.generate import GenerationError, run_generate

    rows = _prompts(30)
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    cfg = load(_config(tmp_path, tiny_model, str(data), str(tmp_path / "run")))
    first = run_generate(cfg)
    assert set(_all_answer_ids(tmp_path / "run" / "corpus")) == _expected_ids(rows)
    mtime = (tmp_path / "run" / "corpus" / "manifest.json").stat().st_mtime
    assert run_generate(cfg) == first  # finished: nothing regenerated
    assert (tmp_path / "run" / "corpus" / "manifest.json").stat().st_mtime == mtime
    again = run_generate(cfg, overwrite=True)
    assert [r["rows_added"] for r in again["runs"]] == [again["rows_generated"]]
    assert again["runs"][0]["run"] != first["runs"][0]["run"]
    # A finished corpus is not reused, nor an unfinished one continued, with other settings.
    changed = load(_config(tmp_path, tiny_model, str(data), str(tmp_path / "run"), generation={"max_new_tokens": 5}))
    with pytest.raises(GenerationError, match=r"is a finished corpus made with other settings "
                                              r"\(generation.max_new_tokens: 8 -> 5\).*--overwrite"):
        run_generate(changed)
    corpus = tmp_path / "run" / "corpus"
    (corpus / "manifest.json").unlink()
    with pytest.raises(GenerationError, match=r"unfinished generation made with other settings "
                                              r"\(generation.max_new_tokens: 8 -> 5\).*--overwrite"):
        run_generate(changed)


def test_s3_in_and_out(tiny_model, tmp_path, s3_server, ray_local):
    """Prompt shards in s3:// (a folder), corpus written to s3://, read back from the S3 server."""
    from raydistill.config import load
    from raydistill.corpus import read_corpus, read_prompts
    from raydistill.generate import run_generate
    from raydistill.storage import storage_path

    bucket = make_bucket("gen-s3")
    rows = _prompts(24)
    for k in range(3):  # three jsonl shards under one prefix
        shard = write_jsonl(tmp_path / f"part-{k}.jsonl", rows[k * 8:(k + 1) * 8])
        (storage_path(f"{bucket}/prompts/{shard.name}")).write_text(shard.read_text())
    cfg = load(_config(tmp_path, tiny_model, f"{bucket}/prompts", f"{bucket}/runs/a"))
    manifest = run_generate(cfg)
    corpus = storage_path(f"{bucket}/runs/a/corpus")
    table, on_s3 = read_corpus(corpus)
    assert on_s3 == manifest
    assert sorted(_all_answer_ids(corpus)) == sorted(_expected_ids(rows))
    assert table.num_rows == manifest["rows"]
    assert read_prompts(corpus).num_rows == len(rows)
    assert (corpus / "config.yaml").is_file() and not (tmp_path / "runs").exists()
    # a glob over the same shards gives the same prompts
    cfg2 = load(_config(tmp_path, tiny_model, f"{bucket}/prompts/part-[01].jsonl", f"{bucket}/runs/b"))
    assert run_generate(cfg2)["prompts_by_split"] == {s: sum(1 for r in rows[:16] if _split(r) == s)
                                                       for s in ("train", "validation", "test")}


def _split(row: dict, seed: int = 0) -> str:
    """The split of a one-question row (the split hashes the messages, not the id)."""
    from raydistill.data import split_key, split_of

    return split_of(split_key([{"role": "user", "content": row["question"]}]), seed, 0.1, 0.2)


@pytest.mark.slow  # two generate runs with failing rows (6-10 min here); by default the error-window and kept-share rules are unit-tested (test_generate_errors)
def test_error_share_stops_the_job_and_rows_below_it_are_rejects(tiny_model, tmp_path, ray_local):
    """Prompts longer than max_model_len fail on their row; past generation.max_error_share the
    job stops with the share and the first errors, below it they are counted as rejects. Failed
    rows are not committed: the rerun tries those prompts again (and only those)."""
    from raydistill.config import load
    from raydistill.generate import GenerationError, run_generate

    rows = _prompts(20)
    long_ids = [r["qid"] for r in rows][:4]
    for r in rows:
        if r["qid"] in long_ids:  # far past max_model_len=128; not a test prompt (the split hashes the text)
            r["question"] = next(t for k in range(100) for t in [f"{'Paris ' * 200}{r['qid']} {k}"]
                                 if _split({"question": t}) != "test")
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    answered = len(_expected_ids(rows))
    cfg = load(_config(tmp_path, tiny_model, str(data), str(tmp_path / "run"), generation={"max_error_share": 0.1}))
    with pytest.raises(GenerationError, match=rf"4 of {answered} answers failed \(.*%\), more than "
                                              r"generation.max_error_share=10%; first errors: q\d+: prompt has"
                                              r".*answered again by the next run"):
        run_generate(cfg)
    ok = load(_config(tmp_path, tiny_model, str(data), str(tmp_path / "run"), generation={"max_error_share": 0.5}))
    manifest = run_generate(ok)  # continues the same corpus: only the failed prompts are asked again
    assert manifest["rejects"]["error"] == 4 and manifest["finish_reasons"]["error"] == 4
    assert [r["rows_added"] for r in manifest["runs"]] == [answered - 4, 4]
    rejects = pq.read_table(tmp_path / "run" / "corpus" / "rejects").to_pylist()
    assert sorted(r["prompt_id"] for r in rejects if r["reject_reason"] == "error") == sorted(long_ids)


def test_manifest_figures_and_cost(tiny_model, tmp_path, ray_local):
    from raydistill.config import load
    from raydistill.generate import run_generate

    data = write_jsonl(tmp_path / "p.jsonl", _prompts(12))
    cfg = load(_config(tmp_path, tiny_model, str(data), str(tmp_path / "run"),
                       teacher={"price_per_mtok": {"input": 2.0, "output": 10.0}}))
    m = run_generate(cfg)
    table = pq.read_table(tmp_path / "run" / "corpus" / "data")
    rejects = tmp_path / "run" / "corpus" / "rejects"
    tables = [table] + ([pq.read_table(rejects)] if list(rejects.glob("*.parquet")) else [])
    prompt_tokens = sum(sum(t.column("prompt_tokens").to_pylist()) for t in tables)
    response_tokens = sum(sum(t.column("response_tokens").to_pylist()) for t in tables)
    assert (m["prompt_tokens"], m["response_tokens"]) == (prompt_tokens, response_tokens)
    assert m["cost_usd"] == pytest.approx(prompt_tokens / 1e6 * 2.0 + response_tokens / 1e6 * 10.0, abs=1e-4)
    assert m["tokens_per_s"] == pytest.approx(response_tokens / m["seconds"], rel=0.01)
    assert m["prompts"] == m["rows_generated"] and json.loads(json.dumps(m)) == m


# ----------------------------------------------------------------------------- the prompts step alone

def _prompts_step(tmp_path: Path, data: str, **data_settings):
    from raydistill.config import Config
    from raydistill.generate.prompts import write_prompts
    from raydistill.storage import storage_path

    cfg = Config.model_validate({"output_dir": str(tmp_path / "run"),
                                 "data": {"path": data, "prompt_field": "question", "id_field": "qid",
                                          "reference_field": "answer", **data_settings}})
    out = storage_path(tmp_path / "run" / "corpus")
    info = write_prompts(cfg, out)
    return cfg, info, pq.read_table(out.path + "/prompts")


def test_prompt_shards_stream_like_validate_reads_them(tmp_path, ray_local):
    """A folder of JSONL shards whose answer column mixes numbers and text (pyarrow's JSON reader
    refuses that) reads as `raydistill validate` reads the same rows; data.limit keeps exactly
    load_prompts' seeded per-task sample, also when a task keeps most of its rows."""
    from raydistill.data import load_prompts

    rows = [{"qid": f"q{i:03d}", "question": f"What is {i} plus 1?", "answer": i + 1 if i % 2 else f"{i + 1}",
             "kind": "math" if i % 4 else "qa"} for i in range(120)]
    folder = tmp_path / "shards"
    folder.mkdir()
    for k in range(3):
        write_jsonl(folder / f"part-{k}.jsonl", rows[k * 40:(k + 1) * 40])
    whole = write_jsonl(tmp_path / "whole.jsonl", rows)
    for limit in (None, 100):  # 100 of 120: math keeps 75 of 90, qa 25 of 30 (ranks past 2**63 kept)
        extra = {"task_field": "kind", "limit": limit}
        cfg, info, table = _prompts_step(tmp_path / f"l{limit}", str(folder), **extra)
        want = load_prompts(cfg.data.model_copy(update={"path": str(whole)}), cfg.task_prompts)
        got = sorted(table.to_pylist(), key=lambda r: r["prompt_id"])
        assert got == sorted(want.to_pylist(), key=lambda r: r["prompt_id"])
        assert info["rows"] == (limit or 120) and info["inputs"]["files"] == 3
        assert {r["reference"] for r in got if r["prompt_id"] == "q003"} == {"4"}  # a number read as text


def test_csv_cells_with_line_breaks_and_leading_zeros(tmp_path, ray_local):
    import csv

    path = tmp_path / "p.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["qid", "question", "answer"])
        for i in range(30):
            w.writerow([f"00{i}", f"Summarize:\nline one {i}\nline two, with a comma", "007"])
    _, info, table = _prompts_step(tmp_path, str(path))
    rows = {r["prompt_id"]: r for r in table.to_pylist()}
    assert info["rows"] == 30 and "005" in rows and rows["005"]["reference"] == "007"
    assert rows["005"]["messages"][-1]["content"] == "Summarize:\nline one 5\nline two, with a comma"


def test_bad_row_past_the_precheck_names_its_shard_and_line(tmp_path, ray_local):
    from raydistill.data import DataError

    folder = tmp_path / "shards"
    folder.mkdir()
    write_jsonl(folder / "part-0.jsonl", _prompts(5))
    bad = _prompts(5, start=5)
    bad[3]["question"] = ""
    write_jsonl(folder / "part-1.jsonl", bad)
    with pytest.raises(DataError) as err:
        _prompts_step(tmp_path, str(folder), reference_field=None)
    assert str(err.value) == (f"{folder / 'part-1.jsonl'}: line 4: field 'question' (named by data.prompt_field) is "
                              "empty (''); every row needs a prompt")
    assert not (tmp_path / "run" / "corpus" / "prompts" / "_COMPLETE").exists()


def test_parquet_shards_are_read_by_row_group_and_a_corrupt_one_is_named(tmp_path, ray_local):
    """Every row of every row group arrives; a shard whose footer reads but whose pages do not
    (bytes overwritten) stops the prompts step with a DataError naming that file."""
    import pyarrow as pa

    from raydistill.data import DataError

    folder = tmp_path / "shards"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(_prompts(30)), folder / "part-0.parquet", row_group_size=7)
    pq.write_table(pa.Table.from_pylist(_prompts(12, start=30)), folder / "part-1.parquet", row_group_size=5)
    _, info, table = _prompts_step(tmp_path, str(folder), reference_field=None)
    assert info["rows"] == 42 and sorted(table.column("prompt_id").to_pylist()) == [f"q{i:05d}" for i in range(42)]
    bad = folder / "part-1.parquet"
    data = bytearray(bad.read_bytes())
    data[8:200] = b"\xab" * 192  # the first data page; the footer is intact
    bad.write_bytes(bytes(data))
    assert pq.read_schema(bad).names  # the footer still reads: only the pages are broken
    (tmp_path / "again").mkdir()
    with pytest.raises(DataError, match=f"^{bad}: cannot read parquet \\(row group 0\\)"):
        _prompts_step(tmp_path / "again", str(folder), reference_field=None)


def test_half_committed_s3_checkpoints_are_settled(tmp_path):
    """A kill between the copy and the delete of an S3 rename leaves X.pending.parquet beside
    X.parquet: that shard is committed, and the pending file goes (Ray's recovery would otherwise
    delete the shard's data and keep its ids marked done)."""
    from raydistill.generate.resume import settle_checkpoints
    from raydistill.storage import storage_path

    out = storage_path(tmp_path / "corpus")
    for name in ("a.parquet", "a.pending.parquet", "b.pending.parquet", "c.parquet"):
        (out / "_checkpoint" / name).write_text("x")
    settle_checkpoints(out)
    assert sorted(p.name for p in (tmp_path / "corpus" / "_checkpoint").iterdir()) == \
        ["a.parquet", "b.pending.parquet", "c.parquet"]


def test_settings_a_corpus_must_share(tmp_path):
    """A filter change re-filters an unfinished corpus but cannot change a finished one (its raw
    answers are gone): refused there. data.label_map only affects scoring: never a change."""
    from raydistill.config import Config
    from raydistill.generate.resume import GenerationError, check_settings, shared_settings
    from raydistill.storage import storage_path

    out = storage_path(tmp_path / "corpus")
    base = Config()
    check_settings(out, shared_settings(base, "tok"))  # first run: recorded
    refilter = base.model_copy(update={"filter": base.filter.model_copy(update={"truncated": True})})
    check_settings(out, shared_settings(refilter, "tok"))  # unfinished: the filter pass runs again anyway
    with pytest.raises(GenerationError, match=r"finished corpus made with other settings \(filter.truncated: "
                                              r"False -> True\)"):
        check_settings(out, shared_settings(refilter, "tok"), finished=True)
    relabel = base.model_copy(update={"data": base.data.model_copy(update={"label_map": {"0": "entailment"}})})
    check_settings(out, shared_settings(relabel, "tok"), finished=True)
    with pytest.raises(GenerationError, match=r"teacher_tokenizer: 'tok' -> 'other'"):
        check_settings(out, shared_settings(base, "other"))
