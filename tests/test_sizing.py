"""benchmarks/sizing.py: docs/sizing.md's "Scale on paper" table is its default output, and its formulas
hold (per-token bytes against raydistill.schema's columns, GPU-hours linear in the data)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pyarrow as pa
import pytest

REPO = Path(__file__).resolve().parent.parent


def _sizing():
    spec = importlib.util.spec_from_file_location("sizing", REPO / "benchmarks" / "sizing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(capsys, *argv: str) -> tuple[str, dict]:
    assert _sizing().main(list(argv)) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    return "\n".join(lines[:-1]), json.loads(lines[-1])


def test_readme_table_is_the_scripts_default_output(capsys):
    table, raw = _run(capsys)
    assert table.startswith("| quantity | formula | value |") and table.count("\n") > 15
    assert table in (REPO / "docs" / "sizing.md").read_text(), "docs/sizing.md's Scale on paper table differs: rerun " \
        "benchmarks/sizing.py and paste its table"
    assert raw["answered"] == 48_000 and raw["train_rows"] == 47_000 and raw["evaluated"] == 1000
    assert raw["total_gpu_hours"] == pytest.approx(raw["generation_gpu_hours"] + raw["training_gpu_hours"]
                                                   + raw["checkpoint_stall_gpu_hours"] + raw["evaluation_gpu_hours"])


def test_gpu_hours_scale_with_the_data(capsys):
    _, base = _run(capsys)
    _, double = _run(capsys, "--conversations", "100000")
    for key in ("generation_gpu_hours", "training_gpu_hours", "training_tokens", "corpus_bytes_parquet_top20"):
        assert double[key] == pytest.approx(2 * base[key], rel=1e-3), key
    _, longer = _run(capsys, "--output-tokens", "300")
    assert longer["generation_tokens_out"] == 2 * base["generation_tokens_out"]


def test_top_k_counts_in_the_total_and_impossible_inputs_are_refused(capsys):
    _, base = _run(capsys)
    _, k20 = _run(capsys, "--top-k", "20")
    assert k20["total_gpu_hours"] == pytest.approx(base["total_gpu_hours"] - base["generation_gpu_hours"]
                                                   + base["generation_gpu_hours_top20"])
    table, k5 = _run(capsys, "--top-k", "5")
    assert "B with top-5" in table and k5["corpus_bytes_parquet_top20"] < base["corpus_bytes_parquet_top20"]
    for bad in (["--validation", "0.6", "--test", "0.5"], ["--teacher-replicas", "0"], ["--top-k", "30"]):
        with pytest.raises(SystemExit) as e:
            _sizing().main(bad)
        assert e.value.code == 2, bad
    assert "--teacher-replicas must be at least 1" in capsys.readouterr().err


def test_logprob_bytes_match_arrow_buffers_of_the_corpus_columns():
    """2 × (4k + 4 + (k + 1)/8) bytes per answer token: what Arrow holds for top_logprobs_ids and
    top_logprobs (``raydistill.schema``) read back from parquet, as every stage reads the corpus
    (the reader allocates validity bitmaps)."""
    import pyarrow.parquet as pq

    from raydistill.schema import CORPUS_SCHEMA

    sizing = _sizing()
    k, tokens = 20, 4000
    table = pa.table({"ids": pa.array([[list(range(k))] * tokens], CORPUS_SCHEMA.field("top_logprobs_ids").type),
                      "lps": pa.array([[[-1.0] * k] * tokens], CORPUS_SCHEMA.field("top_logprobs").type)})
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    per_token = pq.read_table(pa.BufferReader(buf.getvalue())).nbytes / tokens
    assert per_token == pytest.approx(sizing.logprob_bytes_per_token(k), rel=0.01)
    assert sizing.logprob_bytes_per_token(0) == 0


def test_checkpoints_counted_as_the_trainer_saves_them(capsys):
    """The support config saves at 200, 400, 600 (every 200 steps), at the end of epoch 1 (368:
    validation runs there) and at the last step: 5 full states, not ⌈736 / 200⌉ = 4. The last one
    and student/ also hold the bf16 student; a LoRA run's checkpoints hold adapters + AdamW only."""
    table, raw = _run(capsys)
    params, lora = 14.7e9, raw["inputs"]["lora_params"]
    assert raw["steps"] == 736 and raw["checkpoint_steps"] == [200, 368, 400, 600, 736] and raw["checkpoints"] == 5
    assert raw["checkpoint_total_bytes"] == pytest.approx(5 * 12 * params + 2 * 2 * params)
    assert lora == 48 * 16 * (2 * (5120 + 5120) + 2 * (5120 + 1024)) == 25_165_824  # Qwen2.5-14B, r 16, q/k/v/o
    assert raw["lora_total_bytes"] == pytest.approx(5 * 12 * lora + 2 * 2 * params)
    assert "| 5: 200, 368, 400, 600, 736 |" in table
    assert raw["checkpoint_stall_gpu_hours"] == pytest.approx(raw["checkpoint_total_bytes"] / 0.5e9 / 3600 * 8)
    _, quiet = _run(capsys, "--validation", "0")  # no validation: an epoch end off the 200-step grid is not saved
    assert quiet["checkpoint_steps"] == [200, 400, 600, quiet["steps"]] and quiet["steps"] == 750
    _, fp32 = _run(capsys, "--export-bytes", "4")
    assert fp32["checkpoint_total_bytes"] == pytest.approx(5 * 12 * params + 2 * 4 * params)


def test_checkpoint_steps_cases():
    from raydistill.train.plan import checkpoint_steps

    assert checkpoint_steps(736, 368, 200, has_validation=True) == [200, 368, 400, 600, 736]
    assert checkpoint_steps(750, 375, 200, has_validation=False) == [200, 400, 600, 750]
    assert checkpoint_steps(750, 375, 0, has_validation=False) == [375, 750]  # each epoch end without `every`
    assert checkpoint_steps(10, 5, 5, has_validation=False) == [5, 10]  # an epoch end on the grid: once
    assert checkpoint_steps(3, 3, 0, has_validation=True) == [3]  # one epoch: the final checkpoint only
    assert checkpoint_steps(5, 2, 1, has_validation=False) == [1, 2, 3, 4, 5]
