"""The generation benchmark runs end to end in its --quick form and ends with its JSON line.

No timing is asserted: the figures depend on the machine; only that they exist and are positive.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "generate_throughput.py"


@pytest.mark.bench
@pytest.mark.vllm
def test_generate_throughput_quick(tmp_path):
    # Short work path: Ray's socket paths must stay under 108 characters.
    work = Path(tmp_path)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--workdir", str(work)],
                          capture_output=True, text=True, timeout=3600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = proc.stdout.strip().splitlines()[-1]
    result = json.loads(last)
    assert {"ratio", "driver_rss_ratio", "throughput", "memory", "settings"} <= set(result)
    assert result["ratio"] > 0
    assert result["driver_rss_ratio"] > 0
    tp = result["throughput"]
    (r,) = tp["rounds"]
    for side in ("raydistill", "vllm"):
        assert r[side]["response_tokens"] > 0 and r[side]["tokens_per_s"] > 0, r
        assert r[side]["startup_s"] > 0, r
    assert r["raydistill"]["rows"] == r["vllm"]["rows"] == result["settings"]["prompts"]
    # Both engines read identical prompt token ids with greedy sampling: the same answers.
    assert r["same_tokens_share"] > 0.5, r
    runs = result["memory"]["runs"]
    assert sorted(int(n) for n in runs) == result["settings"]["mem_prompts"]
    assert all(v["peak_rss_mib"] > 0 and v["rows"] == int(n) for n, v in runs.items())


TRAIN_SCRIPT = REPO / "benchmarks" / "train_throughput.py"


@pytest.mark.bench
@pytest.mark.slow
def test_train_throughput_tiny(tmp_path):
    """The training benchmark's --tiny form: plain loop, run_train with 1 and 2 workers, and the
    memory of one step per loss, ending with its JSON line (figures positive; none asserted)."""
    proc = subprocess.run([sys.executable, str(TRAIN_SCRIPT), "--tiny", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=3600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"ratio", "memory", "scaling", "throughput", "memory_runs", "settings", "load_avg_start"} <= set(result)
    assert result["ratio"] > 0 and result["memory"] > 0 and result["scaling"] > 0
    (r,) = result["throughput"]["rounds"]
    steps, warmup = result["settings"]["steps"], result["settings"]["warmup"]
    for arm in ("plain", "ray1", "ray2"):
        assert r[arm]["measured_steps"] == steps - warmup and r[arm]["tokens_per_s"] > 0, (arm, r[arm])
    # Every example is exactly seq_len tokens (no padding); 2 workers run twice the tokens per step.
    # (The Ray arms' counts come from metrics.jsonl's rounded tokens_per_s × seconds: within 2 %.)
    per_step = result["settings"]["batch_size"] * result["settings"]["seq_len"]
    assert r["plain"]["tokens_per_step"] == per_step
    assert r["ray1"]["tokens_per_step"] == pytest.approx(per_step, rel=0.02)
    assert r["ray2"]["tokens_per_step"] == pytest.approx(2 * per_step, rel=0.02)
    # The same random student on random ids: both start near ln(vocab) (the batches differ: Ray shuffles).
    assert abs(r["plain"]["losses"][0] - r["ray1"]["losses"][0]) < 0.2, (r["plain"]["losses"], r["ray1"]["losses"])
    runs = result["memory_runs"]["runs"]
    assert set(runs) == {"sequence_kd", "logit_kd"}
    assert runs["logit_kd"]["kd_sum"] > 0 and runs["sequence_kd"]["kd_sum"] == 0
    assert all(v["peak_rss_mib"] > 0 for v in runs.values())
