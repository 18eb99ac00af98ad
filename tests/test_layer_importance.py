"""student.prune.method=importance: Block Influence (ShortGPT) picks the layers a pruned student keeps."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from raydistill.config import ConfigError, load
from raydistill.layer_importance import block_influence, calibration_batches, calibration_rows, most_influential
from raydistill.models import ModelError

from .conftest import build_tiny_model
from .helpers import user_config, write_corpus

PASS_THROUGH = (1, 2, 4)  # layers whose output is their input: attention and MLP write nothing


def _teacher_with_pass_through_layers(folder: Path) -> Path:
    """A 6-layer tiny Llama whose layers ``PASS_THROUGH`` add nothing to the residual stream (their
    attention output and MLP down projections are zero): removing them changes nothing."""
    build_tiny_model(folder, num_layers=6, seed=3)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for i in PASS_THROUGH:
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()
    model.save_pretrained(folder)
    return folder


def _batches(folder: Path, texts: list[str]) -> list[dict]:
    tok = AutoTokenizer.from_pretrained(folder)
    rows = [{"messages": [{"role": "user", "content": t}], "response": "The answer is " + t[-3:]} for t in texts]
    return calibration_batches(tok, rows, max_tokens=48, batch_size=2)


def test_block_influence_is_one_minus_the_mean_cosine_and_finds_the_layers_that_do_nothing(tmp_path):
    folder = _teacher_with_pass_through_layers(tmp_path / "teacher")
    model = AutoModelForCausalLM.from_pretrained(folder)
    batches = _batches(folder, ["What is 2 plus 3?", "Summarize: the cat sat on the mat all day.", "Hi"])
    scores = block_influence(model, batches)
    assert len(scores) == 6
    # the naive reference, token by token: hidden_states[i] enters layer i and hidden_states[i + 1]
    # leaves it (the last entry has the final norm applied, so it is checked on the identity layers only)
    total, count = [0.0] * 5, 0
    with torch.no_grad():
        for b in batches:
            hs = model(**b, output_hidden_states=True).hidden_states
            for row in range(b["input_ids"].shape[0]):
                for t in range(b["input_ids"].shape[1]):
                    if not b["attention_mask"][row, t]:
                        continue
                    count += 1
                    for i in range(5):
                        x, y = hs[i][row, t], hs[i + 1][row, t]
                        # a zero vector (the pad/eos token's embedding here) counts as cosine 0, as in torch
                        total[i] += float(x @ y / (x.norm().clamp(min=1e-8) * y.norm().clamp(min=1e-8)))
    assert scores[:5] == pytest.approx([1 - s / count for s in total], abs=1e-5)
    assert all(abs(scores[i]) < 1e-5 for i in PASS_THROUGH), scores
    assert all(scores[i] > 1e-3 for i in (0, 3, 5)), scores
    assert most_influential(scores, 3) == [0, 3, 5]


def test_most_influential_keeps_model_order_and_breaks_ties_by_index():
    assert most_influential([0.1, 0.5, 0.1, 0.3], 2) == [1, 3]
    assert most_influential([0.2, 0.2, 0.2], 2) == [0, 1]
    assert most_influential([0.4], 1) == [0]
    with pytest.raises(ValueError, match="cannot keep 4 of 3 layers"):
        most_influential([0.1, 0.2, 0.3], 4)


def test_calibration_rows_are_the_same_answered_train_rows_whatever_the_files(tmp_path):
    rows = [{"prompt_id": f"p{i}", "split": ["train", "train", "test", "validation"][i % 4],
             "messages": [{"role": "user", "content": f"q{i}"}], "response": f"a{i}",
             "error": "too long" if i == 8 else None} for i in range(40)]
    schema = pa.schema([("prompt_id", pa.string()), ("split", pa.string()),
                        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
                        ("response", pa.string()), ("error", pa.string())])
    one, two = tmp_path / "one.parquet", [tmp_path / "a.parquet", tmp_path / "b.parquet"]
    pq.write_table(pa.Table.from_pylist(rows, schema), one)
    pq.write_table(pa.Table.from_pylist(rows[::-1][:17], schema), two[0])  # another order, other files
    pq.write_table(pa.Table.from_pylist(rows[::-1][17:], schema), two[1])
    fs = pafs.LocalFileSystem()
    sample = calibration_rows([str(one)], fs, 5, seed=7)
    assert sample == calibration_rows([str(p) for p in two], fs, 5, seed=7)
    assert len(sample) == 5 and len({r["prompt_id"] for r in sample}) == 5
    by_id = {r["prompt_id"]: r for r in rows}
    assert all(by_id[r["prompt_id"]]["split"] == "train" and by_id[r["prompt_id"]]["error"] is None for r in sample)
    assert calibration_rows([str(one)], fs, 5, seed=8) != sample  # the seed picks the rows
    assert len(calibration_rows([str(one)], fs, 100, seed=7)) == 19  # 20 train rows, one with an error


def test_importance_pruning_keeps_the_working_layers_and_records_their_scores(tmp_path):
    """prune_to (the Ray task's body, called here) reads the calibration rows from the corpus's
    shard, keeps the 3 layers that do something, and writes every layer's score in its recipe."""
    from raydistill.train.student import BASELINE_RECIPE, importance_recipe, prune_to

    teacher = _teacher_with_pass_through_layers(tmp_path / "teacher")
    cfg_file, sets = user_config(tmp_path, teacher, 20, "hf")
    cfg = load(cfg_file, sets + ["student.keep_layers=null", "student.prune.method=importance",
                                 "student.prune.num_layers=3", "student.prune.calibration_rows=8"])
    write_corpus(cfg, n=20, answered=None, varied=True)
    prune = importance_recipe(cfg)
    assert prune["num_layers"] == 3 and prune["seed"] == cfg.data.seed and prune["corpus_manifest"]
    dest = tmp_path / "run" / "baseline_student"
    shard = str(tmp_path / "run" / "corpus" / "data" / "part-00000.parquet")
    kept = prune_to(str(teacher), None, str(dest), cfg.storage.model_dump(), {"teacher": str(teacher), "prune": prune},
                    [shard])
    assert kept == [0, 3, 5]
    recipe = json.loads((dest / BASELINE_RECIPE).read_text())
    assert recipe["kept"] == [0, 3, 5] and len(recipe["scores"]) == 6 and recipe["calibration_rows_read"] == 8
    assert [i for i, s in enumerate(recipe["scores"]) if abs(s) < 1e-5] == list(PASS_THROUGH)
    assert AutoModelForCausalLM.from_pretrained(dest).config.num_hidden_layers == 3
    with pytest.raises(ModelError, match=r"student.prune.num_layers=7: the teacher has 6 layers"):
        prune_to(str(teacher), None, str(dest), cfg.storage.model_dump(),
                 {"teacher": str(teacher), "prune": dict(prune, num_layers=7)}, [shard])


def test_keep_layers_and_importance_are_one_choice_too_many(tmp_path):
    with pytest.raises(ConfigError, match="student.keep_layers names the layers"):
        load(None, ["student.keep_layers=[0, 3]", "student.prune.method=importance"])
    assert load(None, []).student.prune.method == "stride"
