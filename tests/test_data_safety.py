"""Nothing read from storage runs code, and bad data is named by file, line and field: a parquet
prompt file with a column of Ray's pickled-object type is refused by validate, by data.py's
reader (with ray.data imported) and by generate's reading path, without unpickling anything."""

from __future__ import annotations

import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner


class _Payload:
    """Unpickling this writes ``marker``: harmless proof that a reader ran the file's code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('unpickled')",)


def _pickled_parquet(path: Path, marker: Path, nested: bool = False) -> Path:
    """A prompt file whose ``extra`` column (or ``meta.extra`` when ``nested``) is Ray Data's
    pickled-object extension type holding ``_Payload``."""
    from ray.data._internal.object_extensions.arrow import ArrowPythonObjectType

    objects = pa.ExtensionArray.from_storage(ArrowPythonObjectType(),
                                             pa.array([pickle.dumps(_Payload(marker))] * 2, pa.large_binary()))
    extra = pa.StructArray.from_arrays([objects], ["extra"]) if nested else objects
    table = pa.table({"qid": ["a", "b"], "question": ["What is 2+2?", "Name a colour."], ("meta" if nested else "extra"): extra})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def test_the_payload_runs_under_a_plain_read(tmp_path):
    """Control: the file really is dangerous — pyarrow unpickles it once ray.data is imported."""
    import ray.data  # noqa: F401  (registers the extension type, as any Ray process has)

    marker = tmp_path / "marker"
    pq.read_table(_pickled_parquet(tmp_path / "p.parquet", marker)).to_pylist()
    assert marker.read_text() == "unpickled"


@pytest.mark.parametrize("nested", [False, True])
def test_data_reader_refuses_the_file_with_ray_data_imported(tmp_path, nested):
    import ray.data  # noqa: F401

    from raydistill.data import DataError, read_records

    marker = tmp_path / "marker"
    path = _pickled_parquet(tmp_path / "p.parquet", marker, nested)
    with pytest.raises(DataError) as err:
        read_records(path)
    col = "meta.extra" if nested else "extra"
    assert str(err.value).startswith(f"{path}: column '{col}' holds pickled Python objects (parquet extension type "
                                     "'ray.data.arrow_pickled_object')")
    assert not marker.exists()


def test_validate_refuses_the_file(tmp_path):
    import ray.data  # noqa: F401

    from raydistill.cli import app

    marker = tmp_path / "marker"
    path = _pickled_parquet(tmp_path / "p.parquet", marker)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"),
                                   "data": {"path": str(path), "prompt_field": "question", "id_field": "qid"}}))
    r = CliRunner().invoke(app, ["validate", str(cfg)])
    assert r.exit_code == 2, r.output
    assert f"{path}: column 'extra' holds pickled Python objects" in r.output and "config OK" not in r.output
    assert not marker.exists()


def test_generate_refuses_a_bad_shard_before_any_reader(tmp_path, tiny_model):
    """A folder of shards whose second shard has the column (the driver's precheck reads only the
    first): generate's file listing reads every footer and refuses it before Ray Data or the
    prompts step reads a row; run_generate fails before starting Ray."""
    import ray
    import ray.data  # noqa: F401

    from raydistill.config import Config
    from raydistill.data import DataError
    from raydistill.generate import run_generate
    from raydistill.generate.prompts import write_prompts
    from raydistill.storage import storage_path

    marker = tmp_path / "marker"
    folder = tmp_path / "shards"
    folder.mkdir()
    pq.write_table(pa.table({"qid": ["c"], "question": ["Hi?"]}), folder / "part-0.parquet")
    bad = _pickled_parquet(folder / "part-1.parquet", marker)
    cfg = Config.model_validate({"output_dir": str(tmp_path / "run"), "teacher": {"model": str(tiny_model), "engine": "hf"},
                                 "data": {"path": str(folder), "prompt_field": "question", "id_field": "qid"}})
    message = f"{bad}: column 'extra' holds pickled Python objects"
    with pytest.raises(DataError, match=message):
        write_prompts(cfg, storage_path(tmp_path / "run" / "corpus"))
    was_running = ray.is_initialized()
    with pytest.raises(DataError, match=message):
        run_generate(cfg)
    assert ray.is_initialized() == was_running, "generate started Ray before refusing the file"
    assert not marker.exists()


# ----------------------------------------------------------------------------- text that is not Unicode

SURROGATE_MSG = ("field {field!r} holds a lone surrogate \\ud83d at character 11 (after 'great job '): half of a "
                 "UTF-16 pair is not Unicode text; fix the escape in the file (a whole pair, e.g. \\ud83d\\ude00) "
                 "or remove it")


def _data_cfg(path: Path, **extra):
    from raydistill.config import DataConfig

    return DataConfig.model_validate({"path": str(path), "prompt_field": "question", "id_field": "qid", **extra})


def test_lone_surrogate_in_jsonl_names_file_line_and_field(tmp_path):
    """`"great job \\ud83d"` (an emoji's first half) used to end in a pyarrow/hashlib traceback."""
    from raydistill.data import DataError, load_prompts

    path = tmp_path / "p.jsonl"
    path.write_text('{"qid": "a", "question": "ok"}\n{"qid": "b", "question": "great job \\ud83d"}\n'
                    '{"qid": "c", "question": "fine \\ud83d\\ude00"}\n')  # a whole pair is fine
    with pytest.raises(DataError) as err:
        load_prompts(_data_cfg(path))
    assert str(err.value) == f"{path}: line 2: " + SURROGATE_MSG.format(field="question")
    # the same in a chat history (data.messages_field), and in a .json list
    path.write_text('{"qid": "a", "chat": [{"role": "user", "content": "great job \\ud83d"}]}\n')
    with pytest.raises(DataError) as err:
        load_prompts(_data_cfg(path, prompt_field=None, messages_field="chat"))
    assert str(err.value) == f"{path}: line 1: " + SURROGATE_MSG.format(field="chat[0].content")
    jpath = tmp_path / "p.json"
    jpath.write_text('[{"qid": "a", "question": "ok"}, {"qid": "b", "question": "great job \\udc83"}]')
    with pytest.raises(DataError, match=rf"^{jpath}: item 2: field 'question' holds a lone surrogate \\udc83"):
        load_prompts(_data_cfg(jpath))


def test_lone_surrogate_refused_by_validate_and_by_generates_shard_parser(tmp_path):
    from raydistill.cli import app
    from raydistill.data import DataError, parse_records

    path = tmp_path / "p.jsonl"
    path.write_text('{"qid": "b", "question": "great job \\ud83d"}\n')
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"),
                                   "data": {"path": str(path), "prompt_field": "question", "id_field": "qid"}}))
    r = CliRunner().invoke(app, ["validate", str(cfg)])
    assert r.exit_code == 2 and f"{path}: line 1: field 'question' holds a lone surrogate" in r.output, r.output
    # generate's Ray Data tasks parse each shard's bytes with parse_records
    with pytest.raises(DataError, match=r"^s3://b/part-3.jsonl: line 1: field 'question' holds a lone surrogate"):
        parse_records(path.read_bytes(), ".jsonl", "s3://b/part-3.jsonl")


def test_parquet_string_that_is_not_utf8_names_file_row_and_field(tmp_path):
    """The parquet kind of the same fault: a string column holding bytes that are not UTF-8
    (pyarrow's to_pylist raised a bare UnicodeDecodeError), in data.py and in generate's batches."""
    from raydistill.data import DataError, read_records
    from raydistill.generate.prompts import _prompt_batch

    bad = pa.array([b"fine", b"caf\xe9"], pa.binary()).view(pa.string())  # latin-1, not UTF-8
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"qid": ["a", "b"], "question": bad}), path)
    with pytest.raises(DataError) as err:
        read_records(path)
    assert str(err.value) == (f"{path}: row 2: field 'question' is not UTF-8 text (unexpected end of data at "
                              "byte 3); rewrite the column with valid UTF-8 strings")
    batch = pq.read_table(path).append_column("path", pa.array([str(path)] * 2))
    cfg = _data_cfg(path)
    with pytest.raises(DataError, match=rf"^{path}: a row \(batch row 2\): field 'question' is not UTF-8 text"):
        _prompt_batch(batch, data=cfg.model_dump(), task_prompts={}, rank_seed=None, remote=False,
                      suffix=".parquet", source=str(path), with_paths=True)


def test_read_corpus_keeps_only_the_schema_columns(tmp_path):
    """A corpus shard with an extra pickled-object column (someone who can write the bucket): the
    driver's corpus reader returns the schema's type-checked columns only, so converting its rows
    to Python runs nothing."""
    import json

    import ray.data  # noqa: F401

    from raydistill.corpus import read_corpus
    from raydistill.schema import CORPUS_SCHEMA, SCHEMA_VERSION, conform

    marker = tmp_path / "marker"
    extra = _pickled_parquet(tmp_path / "x.parquet", marker)
    row = {"prompt_id": "a", "split": "train", "task": "qa", "messages": [{"role": "user", "content": "Hi?"}],
           "response": "Hello.", "teacher": "t", "generation_params": "{}"}
    table = conform(pa.Table.from_pylist([row] * 2), CORPUS_SCHEMA).append_column(
        "extra", pq.read_table(extra).column("extra"))
    (tmp_path / "corpus" / "data").mkdir(parents=True)
    pq.write_table(table, tmp_path / "corpus" / "data" / "part-0.parquet")
    (tmp_path / "corpus" / "manifest.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION,
                                                                    "shards": ["data/part-0.parquet"]}))
    got, _ = read_corpus(tmp_path / "corpus")
    assert got.column_names == CORPUS_SCHEMA.names
    assert got.to_pylist()[0]["response"] == "Hello."
    assert not marker.exists()
