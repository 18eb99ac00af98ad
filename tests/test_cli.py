"""The command line: validate, overrides, and each bad input's error with a non-zero exit."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from raydistill.cli import app

from .conftest import mixed_prompts, write_jsonl


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture
def cfg_file(tmp_path) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out")}))
    return p


def user_sets(path: Path) -> list[str]:
    return ["--set", f"data.path={path}", "--set", "data.prompt_field=question",
            "--set", "data.task_field=kind", "--set", "data.id_field=qid"]


def test_validate_users_own_jsonl(tmp_path, cfg_file):
    data = write_jsonl(tmp_path / "mine.jsonl", mixed_prompts(30))
    r = invoke("validate", str(cfg_file), *user_sets(data))
    assert r.exit_code == 0, r.output
    assert "config OK: 30 prompts" in r.output
    counts = dict(part.split() for part in r.output.split("(")[1].split(")")[0].split(", "))
    assert sum(int(v) for v in counts.values()) == 30


def test_demo_config_validates():
    from raydistill.config import demo_config_path

    r = invoke("validate", str(demo_config_path()))
    assert r.exit_code == 0, r.output
    assert "250 prompts" in r.output


@pytest.mark.parametrize("content,expect", [
    (None, "data file not found"),
    ("", "the dataset is empty"),
    ('{"question": "a", "kind": "qa"}\n{"question": "b", "kind": "qa"}\n{"question": oops}\n',
     ":3: malformed JSON line"),
    ('{"text": "a", "kind": "qa"}\n', "field 'question' (named by data.prompt_field) is missing"),
    ('{"question": "a", "kind": "poetry"}\n', "unknown task type 'poetry'"),
])
def test_bad_data_exits_nonzero_naming_the_problem(tmp_path, cfg_file, content, expect):
    path = tmp_path / "bad.jsonl"
    if content is not None:
        path.write_text(content)
    r = invoke("validate", str(cfg_file), *user_sets(path))
    assert r.exit_code == 2
    assert expect in r.output and "bad.jsonl" in r.output


def test_template_naming_absent_field(tmp_path, cfg_file):
    data = write_jsonl(tmp_path / "d.jsonl", [{"dialogue": "A: hi", "kind": "summarization"}])
    r = invoke("validate", str(cfg_file), "--set", f"data.path={data}", "--set",
               "data.prompt_template=Summarize this dialogue:\n{dialog}", "--set", "data.task_field=kind")
    assert r.exit_code == 2
    assert "field 'dialog' (named by data.prompt_template) is missing" in r.output and "line 1" in r.output


def test_bad_config_key_and_value(cfg_file):
    r = invoke("validate", str(cfg_file), "--set", "teacher.modle=x")
    assert r.exit_code == 2 and "teacher.modle: unknown key" in r.output
    r = invoke("validate", str(cfg_file), "--set", "train.lr=-1")
    assert r.exit_code == 2 and "train.lr" in r.output and "-1" in r.output


def test_run_writes_resolved_config_before_failing(tmp_path, cfg_file):
    """Every command writes config.yaml; a stage failing on bad input exits 2 with the message."""
    r = invoke("generate", str(cfg_file), "--set", f"data.path={tmp_path / 'missing.jsonl'}")
    assert r.exit_code == 2 and "data file not found" in r.output
    resolved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert resolved["data"]["path"] == str(tmp_path / "missing.jsonl")
    assert not (tmp_path / "out" / "corpus").exists()


def test_validate_preflight_catches_later_failures(tmp_path, cfg_file, tiny_model):
    data = write_jsonl(tmp_path / "mine.jsonl", mixed_prompts(30))
    r = invoke("validate", str(cfg_file), *user_sets(data), "--set", "data.split.test=0",
               "--set", f"teacher.model={tiny_model}", "--set", "student.keep_layers=[0, 99]",
               "--set", "train.workers=64", "--set", "student.init=prune")
    assert r.exit_code == 2, r.output
    assert "student.keep_layers: [99] out of range; the teacher has 4 layers" in r.output
    assert "fewer than train.workers=64" in r.output
    assert "the test split (eval.split) is empty" in r.output
    r = invoke("validate", str(cfg_file), *user_sets(data), "--set", "teacher.model=/nonexistent/model")
    assert r.exit_code == 2 and "teacher.model: model folder not found: /nonexistent/model" in r.output
    r = invoke("validate", str(cfg_file), *user_sets(data), "--set", "student.init=pretrained",
               "--set", "student.model=nobody/not-cached-model")
    assert r.exit_code == 2 and "neither a local folder nor in the local Hugging Face cache" in r.output


def test_version_lists_the_stack():
    r = invoke("--version")
    assert r.exit_code == 0 and r.output.startswith("python ") and " raydistill 0.1.0" in r.output


def test_interrupt_exits_130_with_a_message(tmp_path, cfg_file, monkeypatch):
    import raydistill.generate

    def interrupted(cfg, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(raydistill.generate, "run_generate", interrupted)
    r = invoke("generate", str(cfg_file))
    assert r.exit_code == 130 and "interrupted during stage generate" in r.output


def test_validate_checks_layers_and_lora_against_an_unconverted_embedded_teacher(tmp_path, cfg_file, monkeypatch):
    """On a fresh machine the embedded teacher is still a GGUF: validate converts it to check
    student.keep_layers and train.lora, instead of printing "config OK" and failing in train."""
    monkeypatch.setenv("RAYDISTILL_CACHE", str(tmp_path / "empty-cache"))
    data = write_jsonl(tmp_path / "mine.jsonl", mixed_prompts(30))
    r = invoke("validate", str(cfg_file), *user_sets(data), "--set", "student.keep_layers=[0,99]",
               "--set", "train.lora.enabled=true", "--set", "train.lora.target_modules=[qkv_proj]")
    assert r.exit_code == 2, r.output
    assert "converting embedded:SmolLM2-135M-Instruct once" in r.output
    assert "student.keep_layers: [99] out of range; the teacher has 30 layers" in r.output
    assert "train.lora.target_modules: no module named qkv_proj in the student" in r.output
    assert (tmp_path / "empty-cache" / "models" / "SmolLM2-135M-Instruct" / "config.json").is_file()


def test_validate_an_api_teacher_and_a_folder_of_shards(tmp_path, cfg_file, tiny_model, monkeypatch):
    """An API teacher's model is a name the endpoint serves, not a local model: validate checks
    its tokenizer instead. A folder of shards is checked on a sample: its split sizes are the
    sample's and are not held against train.workers."""
    folder = tmp_path / "shards"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", mixed_prompts(3))
    write_jsonl(folder / "b.jsonl", mixed_prompts(40)[3:])
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    api = ["--set", "teacher.engine=openai", "--set", "teacher.base_url=http://127.0.0.1:9/v1",
           "--set", "teacher.model=deepseek-chat", "--set", "student.init=pretrained",
           "--set", f"student.model={tiny_model}", "--set", "train.workers=8"]
    r = invoke("validate", str(cfg_file), *user_sets(folder), *api)
    assert r.exit_code == 0, r.output
    assert "config OK: 3 prompts" in r.output and "a sample: the first 3 rows of" in r.output and "1 of 2 file(s)" in r.output
    r = invoke("validate", str(cfg_file), *user_sets(folder), *api, "--set", f"teacher.tokenizer={tmp_path / 'none'}")
    assert r.exit_code == 2 and "teacher.tokenizer:" in r.output
    monkeypatch.delenv("OPENAI_API_KEY")
    r = invoke("validate", str(cfg_file), *user_sets(folder), *api)
    assert r.exit_code == 2 and "teacher.api_key_env: environment variable OPENAI_API_KEY is not set" in r.output


def test_validate_reads_a_spark_folder_the_way_generate_lists_it(tmp_path, cfg_file):
    """A folder as Spark writes it (one part file, ``_SUCCESS``, hidden ``.crc`` files) is one
    prompt file for both commands: generate's ``prompt_files`` lists it, validate checks it whole."""
    from raydistill.config import load
    from raydistill.generate.prompts import prompt_files

    folder = tmp_path / "spark-out"
    folder.mkdir()
    write_jsonl(folder / "part-00000.jsonl", mixed_prompts(30))
    (folder / "_SUCCESS").write_text("")
    (folder / ".part-00000.jsonl.crc").write_bytes(b"\x00crc")
    r = invoke("validate", str(cfg_file), *user_sets(folder))
    assert r.exit_code == 0, r.output
    assert "config OK: 30 prompts" in r.output and "a sample" not in r.output
    files, suffix = prompt_files(load(cfg_file, [s for s in user_sets(folder) if s != "--set"]))
    assert [f.name for f in files] == ["part-00000.jsonl"] and suffix == ".jsonl"


def test_a_truncated_parquet_shard_is_named_by_validate_and_generate(tmp_path, cfg_file):
    """A shard cut short (its footer lost) stops both commands with the file's name, before any job."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raydistill.config import load
    from raydistill.data import DataError
    from raydistill.generate.prompts import prompt_files

    folder = tmp_path / "shards"
    folder.mkdir()
    rows = mixed_prompts(20)
    pq.write_table(pa.Table.from_pylist(rows[:10]), folder / "part-00000.parquet")
    pq.write_table(pa.Table.from_pylist(rows[10:]), folder / "part-00001.parquet")
    cut = folder / "part-00001.parquet"
    cut.write_bytes(cut.read_bytes()[:-40])
    r = invoke("validate", str(cfg_file), *user_sets(folder))
    assert r.exit_code == 2 and f"{cut}: cannot read parquet" in r.output, r.output
    with pytest.raises(DataError, match=f"{cut}: cannot read parquet"):
        prompt_files(load(cfg_file, [s for s in user_sets(folder) if s != "--set"]))
