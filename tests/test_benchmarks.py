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
