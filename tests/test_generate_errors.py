"""Failed generation rows are retried, an outage stops the run early, and a corpus the filters
leave empty fails with the reasons: the real generate stage with a scripted test engine in place
of the model (``answer.answer_dataset`` is swapped; everything around it runs as in production)."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from .conftest import write_jsonl


def scripted_engine(fail_from: int | None, calls: Path, response: str = "Paris is the capital of France.",
                    finish: str = "stop"):
    """An ``answer_dataset`` stand-in: each prompt ``q<i>`` gets ``response`` ending with
    ``finish``, or an error row (an API outage) when ``i >= fail_from``. Every prompt id it is
    asked is appended to a file under ``calls`` (one file per batch), so a test can see exactly
    which prompts each run sent."""

    def answer_dataset(ds, model, engine, gen, storage=None):
        def run(batch):
            import uuid

            import pyarrow as pa

            from raydistill.generate.common import GENERATED_SCHEMA

            rows = batch.to_pylist()
            calls.mkdir(parents=True, exist_ok=True)
            (calls / uuid.uuid4().hex).write_text("\n".join(r["prompt_id"] for r in rows))
            out = []
            for r in rows:
                failed = fail_from is not None and int(r["prompt_id"][1:]) >= fail_from
                out.append(dict(r, response="" if failed else response, response_token_ids=[] if failed else [7, 2],
                                finish_reason="error" if failed else finish, prompt_tokens=5,
                                response_tokens=0 if failed else 2, latency_s=None if failed else 0.01,
                                batch_id="b", top_logprobs_ids=None, top_logprobs=None,
                                error="HTTP 503: service unavailable" if failed else None))
            return pa.Table.from_pylist(out, schema=GENERATED_SCHEMA)

        return ds.map_batches(run, batch_format="pyarrow", batch_size=engine.batch_size)

    return answer_dataset


def _asked(calls: Path) -> list[str]:
    return [pid for f in sorted(calls.glob("*")) for pid in f.read_text().split("\n") if pid] if calls.is_dir() else []


def _config(tmp_path: Path, model: Path, n: int, **extra) -> Path:
    rows = [{"qid": f"q{i:03d}", "question": f"Tell me fact number {i} about Paris."} for i in range(n)]
    write_jsonl(tmp_path / "p.jsonl", rows)
    cfg = {"output_dir": str(tmp_path / "run"),
           "data": {"path": str(tmp_path / "p.jsonl"), "prompt_field": "question", "id_field": "qid",
                    "split": {"validation": 0.1, "test": 0.2}},
           "teacher": {"model": str(model), "engine": "hf", "batch_size": 4},
           "generation": {"max_new_tokens": 8}}
    for key, value in extra.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "run.yaml"


def _train_val_ids(tmp_path: Path) -> set[str]:
    table = pq.read_table(tmp_path / "run" / "corpus" / "prompts")
    return {r["prompt_id"] for r in table.to_pylist() if r["split"] != "test"}


@pytest.mark.slow  # whole generate/Ray Data runs (1-3 min here); the unit tests above cover the rule
def test_outage_stops_early_and_the_rerun_answers_exactly_the_rest(tiny_model, tmp_path, ray_local, monkeypatch):
    """An outage from prompt q040 on: the run stops once more than max_error_rate of the last
    error_window requests failed, naming the rate and what it kept; failed rows are not committed.
    The rerun (engine healthy again) asks the engine for exactly the prompts not answered before,
    and the finished corpus holds every prompt once."""
    from raydistill.config import load
    from raydistill.generate import GenerationError, answer, run_generate

    cfg = load(_config(tmp_path, tiny_model, 60, generation={"error_window": 8, "max_error_rate": 0.5,
                                                             "rows_per_file": 8},
                       filter={"duplicates": False}))  # one Ray pass less: duplicates are not this test's subject
    first_calls, second_calls = tmp_path / "calls1", tmp_path / "calls2"
    monkeypatch.setattr(answer, "answer_dataset", scripted_engine(40, first_calls))
    with pytest.raises(GenerationError) as err:
        run_generate(cfg)
    msg = str(err.value)
    ids = _train_val_ids(tmp_path)
    m = re.search(r"generation stopped early: (\d) of the last 8 requests failed \((\d+)%, more than "
                  r"generation.max_error_rate=50% over generation.error_window=8\) after (\d+) requests of this run; "
                  r"last error: HTTP 503: service unavailable\. Kept: (\d+) answers of (\d+) prompts", msg)
    assert m, msg
    failed_in_window, seen, kept, total = int(m[1]), int(m[3]), int(m[4]), int(m[5])
    assert failed_in_window >= 5 and int(m[2]) == round(100 * failed_in_window / 8)
    assert total == len(ids) and seen < total, "the run did not stop early"
    corpus = tmp_path / "run" / "corpus"
    files = sorted((corpus / "generated").glob("*.parquet"))
    committed = [p for f in files for p in pq.read_table(f).column("prompt_id").to_pylist()]
    assert kept == len(committed) and all(int(p[1:]) < 40 for p in committed), "a failed row was committed"
    assert f"{total - kept} prompts" in msg and "rerun" in msg
    # Files of rows_per_file=8 answers, each with its one checkpoint file: not one per engine batch of 4.
    checkpoints = [p for p in (corpus / "_checkpoint").glob("*.parquet") if not p.name.endswith(".pending.parquet")]
    assert len(files) == len(checkpoints) <= kept // 8 + 1 < len(list(first_calls.glob("*")))
    assert sum(pq.read_metadata(f).num_rows >= 8 for f in files) >= len(files) - 1

    monkeypatch.setattr(answer, "answer_dataset", scripted_engine(None, second_calls))
    from raydistill.generate import stage

    written: list[int] = []
    cleanup = stage.cleanup
    monkeypatch.setattr(stage, "cleanup", lambda out: (written.append(len(list((corpus / "generated").glob(
        "*.parquet")))), cleanup(out)))
    manifest = run_generate(cfg)
    asked = _asked(second_calls)
    assert sorted(asked) == sorted(ids - set(committed)), "the rerun did not ask exactly the unanswered prompts"
    batches = len(list(first_calls.glob("*"))) + len(list(second_calls.glob("*")))
    assert written and written[0] <= len(ids) // 8 + 2 < batches, (written, batches)
    final = pq.read_table(corpus / "data").column("prompt_id").to_pylist()
    rejects = corpus / "rejects"
    if list(rejects.glob("*.parquet")):
        final += pq.read_table(rejects).column("prompt_id").to_pylist()
    assert sorted(final) == sorted(ids), "every prompt exactly once"
    assert manifest["rows_generated"] == len(ids) and manifest["rows_with_error"] == 0
    assert [r["rows_added"] for r in manifest["runs"]] == [kept, len(ids) - kept]
    # both runs' error-window actors are gone (Ray Data's plan kept a handle: they used to stay alive
    # for the whole Ray session, one per generate run)
    # read from this session's GCS (the state API would need a dashboard, and without an address it
    # may follow the machine's /tmp/ray/ray_current_cluster to another, or a dead, cluster)
    from ray._private.state import actors

    alive = [a for a in actors().values() if a["ActorClassName"] == "_ErrorWindow" and a["State"] == "ALIVE"]
    assert not alive, alive


def test_error_window_counts_the_last_requests_only():
    """The stop needs more than max_rate of the *last* `window` requests failed: old failures
    slide out, and no stop before the window is full."""
    from raydistill.generate.answering import _ErrorWindow

    w = _ErrorWindow(window=4, max_rate=0.5)
    assert w.add([True, True], "e1") is None  # 2 requests: window not full
    assert w.add([False, False, False], None) is None  # last 4: T F F F
    assert w.add([True, True], "e2") is None  # last 4: F F T T = 50 %, not more
    stop = w.add([True, False], "e3")  # last 4: F T T T
    assert stop == ("3 of the last 4 requests failed (75%, more than generation.max_error_rate=50% over "
                    "generation.error_window=4) after 8 requests of this run; last error: e3")
    assert w.add([False] * 10, None) == stop  # stays stopped
    assert _ErrorWindow(window=2, max_rate=1.0).add([True] * 5, "x") is None  # 1 = never


def _stat(split: str, finish: str, outcome: str, n: int) -> dict:
    return {"split": split, "finish_reason": finish, "outcome": outcome, "count()": n}


def test_a_corpus_the_filters_empty_fails_with_the_reasons_and_the_setting():
    """The new user's case: 40 math answers, every one cut at max_new_tokens=64 and rejected
    no_final_answer: generate fails (it used to finish, and train failed later without a reason)."""
    from raydistill.config import Config
    from raydistill.generate.filtering import GenerationError, check_kept

    cfg = Config.model_validate({"generation": {"max_new_tokens": 64}})
    stats = [_stat("train", "length", "no_final_answer", 36), _stat("validation", "length", "no_final_answer", 4)]
    with pytest.raises(GenerationError) as err:
        check_kept(stats, cfg)
    assert str(err.value) == (
        "generate: no usable train answer: 0 of 40 answers (0%) pass the filters; "
        "rejected: no_final_answer 40; finish reasons: length 40. To change: every answer (40 of 40) ran into "
        "generation.max_new_tokens=64 (finish_reason 'length'): raise generation.max_new_tokens (or "
        "teacher.max_model_len, when prompts are long). The answers stay in corpus/generated/: a filter change "
        "applies on the next run without generating again; a generation or teacher change needs --overwrite")


def test_kept_share_floor_fails_below_it_and_warns_below_70_percent(caplog):
    from raydistill.config import Config
    from raydistill.generate.filtering import GenerationError, check_kept

    stats = [_stat("train", "stop", "kept", 6), _stat("train", "stop", "reference_mismatch", 3),
             _stat("validation", "length", "truncated", 1)]
    with pytest.raises(GenerationError, match=r"below generation.min_kept_share=80%: 6 of 10 answers \(60%\) pass "
                                              r"the filters; rejected: reference_mismatch 3, truncated 1; finish "
                                              r"reasons: stop 9, length 1\. To change: reference_mismatch: the "
                                              r"teacher disagrees with the references.*filter.match_reference=false"):
        check_kept(stats, Config.model_validate({"generation": {"min_kept_share": 0.8}}))
    with caplog.at_level("WARNING", logger="raydistill.generate.filtering"):
        check_kept(stats, Config())  # default floor 0: 60 % kept only warns
    assert "only 6 of 10 answers (60%) pass the filters" in caplog.text
    caplog.clear()
    check_kept([_stat("train", "stop", "kept", 8), _stat("train", "stop", "empty", 2)], Config())
    assert caplog.text == ""  # 80 % kept: silent


@pytest.mark.slow  # whole generate/Ray Data runs (1-3 min here); the unit tests above cover the rule
def test_generate_fails_when_every_answer_was_cut(tiny_model, tmp_path, ray_local, monkeypatch):
    """Wired into the stage: math prompts whose answers all end at max_new_tokens without a final
    answer fail generate (no manifest, nothing in data/), naming the reason and the setting."""
    from raydistill.config import load
    from raydistill.generate import GenerationError, answer, run_generate

    cfg = load(_config(tmp_path, tiny_model, 10, data={"task": "math"}, filter={"duplicates": False}))
    monkeypatch.setattr(answer, "answer_dataset", scripted_engine(None, tmp_path / "calls", response="Let me think",
                                                                  finish="length"))
    with pytest.raises(GenerationError, match=r"no usable train answer: 0 of (\d+) answers \(0%\) pass the filters; "
                                              r"rejected: no_final_answer \1; finish reasons: length \1\. To change: "
                                              r"every answer \(\1 of \1\) ran into generation.max_new_tokens=8"):
        run_generate(cfg)
    corpus = tmp_path / "run" / "corpus"
    assert not (corpus / "manifest.json").exists() and not (corpus / "data").exists()
