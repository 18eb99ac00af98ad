"""``raydistill bench-serve`` (``raydistill.serve.bench``) and ``eval.latency_source: serve``.

The statistics are checked on made-up timings; the benchmark and the evaluate hook run against a
real OpenAI-compatible server on 127.0.0.1: the session's vLLM API server on the tiny model
(``vllm_server``), which serves it under the names ``teacher`` and ``student`` too (``ab_server``),
the contract ``raydistill serve`` keeps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from raydistill.cli import app
from raydistill.config import load
from raydistill.serve.bench import arm_stats, level_ratios, split_parts
from raydistill.serve.client import EndpointError, RequestRecord, check_endpoint, endpoint_url
from raydistill.stats import percentile, ratio

from .conftest import _free_port, build_tiny_model, mixed_prompts, write_jsonl
from .helpers import write_corpus

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "serve_ab.py"
KEY_ENV, KEY = "RAYDISTILL_TEST_BENCH_KEY", "bench-key-0123456789"


# ----------------------------------------------------------------------------- statistics

def _rec(i: int, latency: float | None, ttft: float | None = None, tokens: int | None = None,
         error: str | None = None) -> RequestRecord:
    return RequestRecord(arm="student", index=i, start_s=0.0, latency_s=latency, ttft_s=ttft, output_tokens=tokens,
                         error=error)


def test_percentile_matches_numpy_linear():
    import numpy as np

    values = [0.31, 5.0, 1.2, 1.2, 9.75, 2.0, 3.3]
    for q in (0, 1, 25, 50, 95, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([4.0], 99) == 4.0
    assert percentile([], 50) is None


def test_arm_stats_on_made_up_timings():
    """Five requests in 2 s of wall time: one failed, one without usage. Latencies 100..400 ms."""
    records = [_rec(0, 0.1, 0.02, 10), _rec(1, 0.2, 0.04, 20), _rec(2, 0.3, None, 30),
               _rec(3, 0.4, 0.08, None), _rec(4, None, error="HTTP 503: queue full")]
    s = arm_stats(records, wall_s=2.0)
    assert (s["requests"], s["answered"], s["errors"]) == (5, 4, 1)
    assert s["first_error"] == "HTTP 503: queue full"
    assert s["latency_ms_p50"] == pytest.approx(250.0)
    assert s["latency_ms_p95"] == pytest.approx(100 + 0.95 * 3 * 100)  # 385: between 300 and 400
    assert s["latency_ms_p99"] == pytest.approx(397.0)
    assert s["ttft_ms_p50"] == pytest.approx(40.0) and s["ttft_ms_p95"] == pytest.approx(76.0)  # 20, 40, 80 ms
    assert s["requests_per_s"] == pytest.approx(4 / 2.0)
    assert s["output_tokens"] == 60 and s["output_tokens_per_s"] == pytest.approx(30.0)
    assert s["mean_output_tokens"] == pytest.approx(20.0) and s["usage_missing"] == 1
    assert s["via"] == "direct"  # the requests named their arm (model: student)
    ab = [RequestRecord(arm="ab", index=0, start_s=0.0, latency_s=0.1)]
    assert arm_stats(ab, 1.0)["via"] == "ab" and arm_stats(ab + records, 1.0)["via"] == "ab+direct"


def test_arm_stats_of_an_arm_that_answered_nothing():
    s = arm_stats([_rec(0, None, error="refused"), _rec(1, None, error="refused")], wall_s=0.5)
    assert s["answered"] == 0 and s["errors"] == 2 and s["first_error"] == "refused"
    for key in ("latency_ms_p50", "ttft_ms_p50", "requests_per_s", "output_tokens_per_s", "mean_output_tokens"):
        assert s[key] is None, key


def test_ratios_and_parts():
    teacher = arm_stats([_rec(0, 0.4, 0.1, 40), _rec(1, 0.4, 0.1, 40)], 0.8)   # 100 tokens/s
    student = arm_stats([_rec(0, 0.1, 0.05, 40), _rec(1, 0.1, 0.05, 40)], 0.2)  # 400 tokens/s
    r = level_ratios({"teacher": teacher, "student": student})
    assert r == {"latency_ratio": pytest.approx(0.25), "throughput_ratio": pytest.approx(4.0)}
    assert level_ratios({"teacher": arm_stats([], 1.0), "student": student})["latency_ratio"] is None
    assert ratio(1.0, 0.0) is None and ratio(None, 2.0) is None and ratio(3.0, 2.0) == 1.5
    # up to 4 parts, each at least `concurrency` requests, covering every request once
    assert split_parts(32, 1) == [(0, 8), (8, 16), (16, 24), (24, 32)]
    assert split_parts(32, 8) == [(0, 16), (16, 32)]  # every client sends 2 requests per part
    assert split_parts(32, 16) == [(0, 32)]
    assert split_parts(4, 16) == [(0, 4)]
    assert split_parts(4, 2) == [(0, 4)]
    assert split_parts(8, 2) == [(0, 4), (4, 8)]


# ----------------------------------------------------------------------------- no endpoint

def test_nothing_on_the_port_is_a_clear_error(tmp_path):
    port = _free_port()
    cfg = load(None, [f"output_dir={tmp_path / 'run'}", f"serve.port={port}"])
    assert endpoint_url(cfg) == f"http://127.0.0.1:{port}/v1"
    assert endpoint_url(load(None, ["serve.host=0.0.0.0"])) == "http://127.0.0.1:8000/v1"
    with pytest.raises(EndpointError, match=r"nothing answers on http://127.0.0.1:\d+/v1 .*start `raydistill serve "
                                            r"CONFIG` first"):
        check_endpoint(endpoint_url(cfg))
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run"), "serve": {"port": port}}))
    r = CliRunner().invoke(app, ["bench-serve", str(cfg_file)])
    assert r.exit_code == 2, r.output
    assert "start `raydistill serve CONFIG` first" in r.output
    assert not (tmp_path / "run" / "bench").exists()


# ----------------------------------------------------------------------------- S3 output_dir

def test_bench_reads_its_prompts_from_and_writes_its_report_to_s3(s3_server, tmp_path, monkeypatch):
    """An s3:// output_dir (as on the documented cluster): the prompts come from <output_dir>/corpus on
    S3 and serve.{json,md,png} + config.yaml land in <output_dir>/bench on S3, serve.json last; nothing
    is written locally. The report is made-up figures in run_bench's shape (no endpoint needed)."""
    from raydistill.corpus import write_prompts
    from raydistill.data import load_prompts
    from raydistill.layout import corpus_location
    from raydistill.schema import SCHEMA_VERSION
    from raydistill.serve.bench import bench_prompts, machine, markdown, write_report
    from raydistill.storage import storage_path

    from .conftest import make_bucket

    monkeypatch.chdir(tmp_path)
    bucket = make_bucket("bench-report")
    data = write_jsonl(tmp_path / "prompts.jsonl", mixed_prompts(30))
    cfg = load(None, [f"output_dir={bucket}/run", f"data.path={data}", "data.prompt_field=question",
                      "data.id_field=qid", "data.task_field=kind", "data.reference_field=answer"])
    prompts = load_prompts(cfg.data, cfg.task_prompts)
    corpus = corpus_location(cfg)
    write_prompts(corpus, prompts)
    (corpus / "manifest.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION, "rows": 0, "shards": []}))
    sent, distinct = bench_prompts(cfg, 12)
    test = [r for r in prompts.to_pylist() if r["split"] == "test"]
    assert distinct == len(test) and len(sent) == 12
    assert {m[-1]["content"] for m in sent} <= {r["messages"][-1]["content"] for r in test}

    stats = {arm: arm_stats([RequestRecord(arm=arm, index=0, start_s=0.0, latency_s=0.2, ttft_s=0.05,
                                           output_tokens=8)], 0.2) for arm in ("teacher", "student")}
    level = {"concurrency": 1, "parts": 1, "arms": stats, **level_ratios(stats)}
    result = {"overhead": None, "latency_ratio": level["latency_ratio"], "throughput_ratio": level["throughput_ratio"],
              "ratio_level": 1, "per_level": {"1": level_ratios(stats)}, "levels": [level],
              "overhead_detail": {"overhead": None, "error": "skipped: serve.bench.overhead_requests is 0"},
              "endpoint": "http://127.0.0.1:8000/v1", "served_models": ["teacher", "student", "ab"],
              "settings": {"concurrency": [1], "requests_per_level": 12, "max_tokens": 8, "split": "test",
                           "distinct_prompts": distinct, "teacher": "t", "student": "s"},
              "machine": {**machine(), "load_avg_start": [0.0, 0.0, 0.0]}, "started": "now"}
    out = write_report(cfg, result)
    bench = storage_path(f"{bucket}/run/bench")
    assert [f.name for f in bench.files()] == ["config.yaml", "serve.json", "serve.md", "serve.png"]
    assert out["files"] == {"json": f"{bucket}/run/bench/serve.json", "markdown": f"{bucket}/run/bench/serve.md",
                            "plot": f"{bucket}/run/bench/serve.png"}
    assert json.loads((bench / "serve.json").read_text()) == out
    assert (bench / "serve.md").read_text() == markdown(out) and "| 1 | student | direct | 1 | 0 |" in markdown(out)
    assert (bench / "serve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert yaml.safe_load((bench / "config.yaml").read_text())["output_dir"] == f"{bucket}/run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl"]  # no local bench/ or s3:/ folder


# ----------------------------------------------------------------------------- a real server

@pytest.fixture(scope="module")
def ab_server(vllm_server) -> int:
    """The port of the session's vLLM OpenAI server (``vllm_server``), which also serves the tiny
    model as ``teacher`` and ``student``: the contract ``raydistill serve`` keeps. It asks for no
    key; the config's key is sent all the same (a real ``raydistill serve`` checks it:
    tests/test_serve.py)."""
    from urllib.parse import urlparse

    return urlparse(vllm_server).port


def _run_config(tmp_path: Path, tiny_model: Path, port: int, extra: dict | None = None) -> Path:
    """A run config over 30 mixed prompts whose endpoint is ``ab_server`` and whose served student is
    the tiny model."""
    data = write_jsonl(tmp_path / "prompts.jsonl", mixed_prompts(30))
    cfg = {"output_dir": str(tmp_path / "run"),
           "data": {"path": str(data), "prompt_field": "question", "reference_field": "answer", "id_field": "qid",
                    "task_field": "kind", "split": {"test": 0.3}},
           "teacher": {"model": str(tiny_model), "engine": "hf", "batch_size": 4, "max_model_len": 160},
           "generation": {"max_new_tokens": 8},
           "serve": {"port": port, "api_key_env": KEY_ENV,
                     "student": {"model": str(tiny_model), "max_model_len": 256, "kv_cache_gib": 1}}}
    for section, values in (extra or {}).items():
        cfg.setdefault(section, {}).update(values)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.vllm
def test_bench_serve_end_to_end(tmp_path, tiny_model, ab_server):
    """benchmarks/serve_ab.py at concurrency [1, 2], 4 requests per level, 2 overhead requests: the
    files, the JSON line's fields and request counts per arm (no timing asserted)."""
    cfg_file = _run_config(tmp_path, tiny_model, ab_server)
    sets = ["serve.bench.concurrency=[1, 2]", "serve.bench.requests_per_level=4", "serve.bench.max_tokens=8",
            "serve.bench.overhead_requests=2"]
    cfg = load(cfg_file, sets)
    write_corpus(cfg, answered=(), task_prompts=True)
    cmd = [sys.executable, str(SCRIPT), str(cfg_file)] + [x for s in sets for x in ("--set", s)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path,
                          env=dict(os.environ, TMPDIR=str(tmp_path), **{KEY_ENV: KEY}))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"overhead", "latency_ratio", "throughput_ratio", "ratio_level", "per_level", "levels",
            "overhead_detail", "settings", "machine"} <= set(result)
    assert result["ratio_level"] == 2 and set(result["per_level"]) == {"1", "2"}
    assert [lv["concurrency"] for lv in result["levels"]] == [1, 2]
    for lv in result["levels"]:
        assert set(lv["arms"]) == {"teacher", "student"}
        counts = {arm: (a["requests"], a["answered"], a["errors"]) for arm, a in lv["arms"].items()}
        assert counts == {"teacher": (4, 4, 0), "student": (4, 4, 0)}, lv
        for a in lv["arms"].values():
            assert 0 < a["latency_ms_p50"] <= a["latency_ms_p95"] <= a["latency_ms_p99"]
            assert a["ttft_ms_p50"] is None or 0 < a["ttft_ms_p50"] <= a["latency_ms_p95"]
            assert a["requests_per_s"] > 0 and a["output_tokens_per_s"] > 0 and a["usage_missing"] == 0
            assert 1 <= a["mean_output_tokens"] <= 8
            assert a["via"] == "direct"  # each request named its arm: not A/B traffic
        assert lv["latency_ratio"] == pytest.approx(
            lv["arms"]["student"]["latency_ms_p50"] / lv["arms"]["teacher"]["latency_ms_p50"])
        assert lv["throughput_ratio"] == pytest.approx(
            lv["arms"]["student"]["output_tokens_per_s"] / lv["arms"]["teacher"]["output_tokens_per_s"])
    assert result["latency_ratio"] == result["per_level"]["2"]["latency_ratio"]
    o = result["overhead_detail"]
    assert o["error"] is None, o
    assert o["inprocess"]["requests"] == o["served"]["requests"] == 2 and o["served"]["errors"] == 0
    assert result["overhead"] == pytest.approx(o["served"]["latency_ms_p50"] / o["inprocess"]["latency_ms_p50"])
    # the same model, greedy, same chat template: the same answers in-process and served
    assert o["same_text_share"] == 1.0
    bench = Path(cfg.output_dir) / "bench"
    assert sorted(p.name for p in bench.iterdir()) == ["config.yaml", "serve.json", "serve.md", "serve.png"]
    assert (bench / "serve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((bench / "serve.json").read_text())["levels"] == result["levels"]
    assert load(bench / "config.yaml").serve.bench.concurrency == [1, 2]
    md = (bench / "serve.md").read_text()
    assert "| 2 | student | direct | 4 | 0 |" in md and "**overhead = " in md and "## Student / teacher" in md


@pytest.mark.vllm
def test_evaluate_takes_latency_from_the_endpoint(tmp_path, tiny_model, ab_server, ray_local, monkeypatch):
    """eval.latency_source=serve: quality from the hf engine's answers, latency and tokens/s of teacher
    and student from the requests to the endpoint (served.parquet), the baseline's null."""
    import statistics

    from raydistill.evaluate import run_evaluate

    monkeypatch.setenv(KEY_ENV, KEY)  # the endpoint's key (serve.api_key_env)

    cfg_file = _run_config(tmp_path, tiny_model, ab_server, {
        "student": {"init": "prune", "keep_layers": [0, 3]},
        "eval": {"engine": "hf", "batch_size": 4, "memory_probe": False, "limit": 4, "rounds": 2,
                 "latency_source": "serve"}})
    cfg = load(cfg_file)
    write_corpus(cfg, answered=(), task_prompts=True)
    out = Path(cfg.output_dir)
    build_tiny_model(out / "baseline_student", num_layers=2, seed=1)
    build_tiny_model(out / "student", num_layers=2, seed=2)
    report = run_evaluate(cfg)

    src = report["timing_source"]
    assert src == {"latency_source": "serve", "endpoint": f"http://127.0.0.1:{ab_server}/v1", "concurrency": 1,
                   "models": {"teacher": "serve", "baseline_student": None, "student": "serve"}}
    served = pq.read_table(out / "eval" / "served.parquet").to_pylist()
    assert len(served) == 2 * 4 and all(r["error"] is None for r in served)
    answers = pq.read_table(out / "eval" / "answers.parquet").to_pylist()
    for name in ("teacher", "student"):
        mine = [r for r in served if r["model"] == name]
        assert all(r["answered_by"] for r in mine)  # vLLM's server names its first alias, not the arm
        assert sorted(r["prompt_id"] for r in mine) == sorted(a["prompt_id"] for a in answers if a["model"] == name)
        m = report["models"][name]
        assert m["answers"] == 4  # quality figures: the engine's answers
        lat = [r["latency_s"] * 1000 for r in mine]
        assert m["latency_ms_p50"] == pytest.approx(statistics.median(lat))
        assert m["output_tokens_per_s"] == pytest.approx(sum(r["response_tokens"] for r in mine)
                                                         / sum(r["latency_s"] for r in mine))
        for rnd in report["timing"]["per_round"]:
            in_round = [r["latency_s"] * 1000 for r in mine if r["round"] == rnd["round"]]
            assert rnd["models"][name]["latency_ms_p50"] == pytest.approx(statistics.median(in_round))
    base = report["models"]["baseline_student"]
    assert base["answers"] == 4 and base["latency_ms_p50"] is None and base["output_tokens_per_s"] is None
    assert report["compared_to_teacher"]["baseline_student"]["latency_ms_p50"]["median"] is None
    assert report["compared_to_teacher"]["student"]["latency_ms_p50"]["median"] is not None
    md = (out / "eval" / "report.md").read_text()
    assert f"come from the running endpoint `http://127.0.0.1:{ab_server}/v1`" in md
    assert "Not served, so no timing figures (n/a): baseline_student." in md
