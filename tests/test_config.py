"""Tests of raydistill.config: defaults, shipped configs, validation errors, overrides, dump."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raydistill import config as rc
from raydistill.config import Config, ConfigError, apply_override, demo_config_path, load

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIRS = ("raydistill/demo", "jobs", "cluster", "benchmarks")
CONFIG_KEYS = set(Config.model_fields)


def _shipped_configs() -> list[Path]:
    found = []
    for d in CONFIG_DIRS:
        root = REPO / d
        if not root.is_dir():
            continue
        for p in sorted(list(root.rglob("*.yaml")) + list(root.rglob("*.yml"))):
            try:
                raw = yaml.safe_load(p.read_text())
            except yaml.YAMLError:
                raw = None
            # Keep only raydistill run configs (cluster/ may hold e.g. Ray cluster YAMLs).
            if isinstance(raw, dict) and CONFIG_KEYS & set(raw):
                found.append(p)
    return found


SHIPPED = _shipped_configs()


def _write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# --- defaults and shipped configs ------------------------------------------------------------

def test_defaults_validate():
    cfg = load()
    assert isinstance(cfg, Config)
    assert cfg == Config()
    assert cfg.data.path == rc.DEMO_DATA
    assert cfg.teacher.model == rc.EMBEDDED_TEACHER
    assert cfg.data.split.validation + cfg.data.split.test < 1


def test_demo_config_loads():
    p = demo_config_path()
    assert p.is_file()
    cfg = load(p)
    assert cfg.data.task_field == "task"
    assert cfg.data.path == rc.DEMO_DATA


def test_found_shipped_configs():
    assert len(SHIPPED) >= 1
    assert demo_config_path().resolve() in {p.resolve() for p in SHIPPED}


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO)) for p in SHIPPED])
def test_shipped_config_validates(path):
    cfg = load(path)
    assert isinstance(cfg, Config)
    # Every value written in the file survives into the validated config unchanged.
    raw = yaml.safe_load(path.read_text())
    dumped = cfg.model_dump(mode="json")

    def check(r, d, where):
        if isinstance(r, dict):
            for k, v in r.items():
                assert k in d, f"{where}{k}"
                check(v, d[k], f"{where}{k}.")
        else:
            assert r == d, where

    check(raw, dumped, "")


# --- unknown keys ------------------------------------------------------------------------------

def test_unknown_top_level_key(tmp_path):
    p = _write(tmp_path, "output_dir: runs/x\nouptut: somewhere\n")
    with pytest.raises(ConfigError) as ei:
        load(p)
    msg = str(ei.value)
    assert "ouptut" in msg
    assert "somewhere" in msg
    assert "unknown key" in msg
    assert str(p) in msg


def test_unknown_nested_key(tmp_path):
    p = _write(tmp_path, "teacher:\n  modle: my/teacher-model\n")
    with pytest.raises(ConfigError) as ei:
        load(p)
    msg = str(ei.value)
    assert "teacher.modle" in msg
    assert "my/teacher-model" in msg


def test_unknown_key_via_override():
    with pytest.raises(ConfigError) as ei:
        load(None, ["train.lora.rnak=8"])
    msg = str(ei.value)
    assert "train.lora.rnak" in msg
    assert "8" in msg


# --- wrong values ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "yaml_text, key, value",
    [
        ("generation:\n  temperature: -1\n", "generation.temperature", "-1"),
        ("train:\n  workers: 0\n", "train.workers", "0"),
        ("data:\n  task: poetry\n", "data.task", "poetry"),
        ("teacher:\n  engine: tensorrt\n", "teacher.engine", "tensorrt"),
        ("generation:\n  top_p: 1.5\n", "generation.top_p", "1.5"),
        ("train:\n  epochs: three\n", "train.epochs", "three"),
    ],
)
def test_wrong_value_names_key_and_value(tmp_path, yaml_text, key, value):
    p = _write(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as ei:
        load(p)
    msg = str(ei.value)
    assert key in msg
    assert value in msg


def test_wrong_value_via_override_names_key_and_value():
    with pytest.raises(ConfigError) as ei:
        load(None, ["generation.temperature=-1"])
    msg = str(ei.value)
    assert "generation.temperature" in msg
    assert "-1" in msg


def test_all_errors_listed(tmp_path):
    p = _write(tmp_path, "train:\n  workers: 0\ngeneration:\n  temperature: -1\n")
    with pytest.raises(ConfigError) as ei:
        load(p)
    msg = str(ei.value)
    assert "train.workers" in msg
    assert "generation.temperature" in msg


def test_split_sum_at_least_one(tmp_path):
    p = _write(tmp_path, "data:\n  split:\n    validation: 0.6\n    test: 0.5\n")
    with pytest.raises(ConfigError) as ei:
        load(p)
    msg = str(ei.value)
    assert "data.split" in msg
    assert "0.6" in msg
    assert "0.5" in msg


def test_split_sum_exactly_one_rejected():
    with pytest.raises(ConfigError) as ei:
        load(None, ["data.split.validation=0.25", "data.split.test=0.75"])
    msg = str(ei.value)
    assert "0.25" in msg and "0.75" in msg


def test_split_sum_below_one_accepted():
    cfg = load(None, ["data.split.validation=0.3", "data.split.test=0.6"])
    assert cfg.data.split.validation == 0.3
    assert cfg.data.split.test == 0.6


# --- overrides ---------------------------------------------------------------------------------

def test_override_value_parsing_raw():
    raw: dict = {}
    apply_override(raw, "a.int=3")
    apply_override(raw, "a.float=0.25")
    apply_override(raw, "a.bool=true")
    apply_override(raw, "a.null=null")
    apply_override(raw, "a.list=[1, 2, 5]")
    apply_override(raw, "a.str=hello world")
    apply_override(raw, "a.eq=x=y")
    assert raw == {"a": {"int": 3, "float": 0.25, "bool": True, "null": None, "list": [1, 2, 5],
                         "str": "hello world", "eq": "x=y"}}
    assert type(raw["a"]["int"]) is int
    assert type(raw["a"]["float"]) is float
    assert raw["a"]["bool"] is True


def test_overrides_applied_to_config(tmp_path):
    cfg = load(
        demo_config_path(),
        [
            "train.workers=4",
            "generation.temperature=0.7",
            "train.use_gpu=true",
            "data.limit=null",
            "student.keep_layers=[0, 3, 6]",
            "output_dir=runs/other",
        ],
    )
    assert cfg.train.workers == 4
    assert cfg.generation.temperature == pytest.approx(0.7)
    assert cfg.train.use_gpu is True
    assert cfg.data.limit is None
    assert cfg.student.keep_layers == [0, 3, 6]
    assert cfg.output_dir == "runs/other"
    # Values in the file that were not overridden are kept.
    assert cfg.data.task_field == "task"


def test_overrides_applied_in_order():
    cfg = load(None, ["train.epochs=2", "train.epochs=5"])
    assert cfg.train.epochs == 5


def test_override_creates_nested_sections(tmp_path):
    p = _write(tmp_path, "output_dir: runs/x\n")
    cfg = load(p, ["train.lora.enabled=true", "train.lora.r=4"])
    assert cfg.train.lora.enabled is True
    assert cfg.train.lora.r == 4
    # Siblings of the created section keep their defaults.
    assert cfg.train.lora.alpha == rc.LoraConfig().alpha
    assert cfg.train.workers == rc.TrainConfig().workers


def test_override_into_non_section():
    with pytest.raises(ConfigError) as ei:
        load(None, ["output_dir=runs/x", "output_dir.x=1"])
    msg = str(ei.value)
    assert "output_dir" in msg
    assert "output_dir.x=1" in msg


def test_override_into_non_section_from_file(tmp_path):
    p = _write(tmp_path, "output_dir: runs/x\n")
    with pytest.raises(ConfigError, match="output_dir"):
        load(p, ["output_dir.x=1"])


def test_override_without_equals():
    with pytest.raises(ConfigError) as ei:
        load(None, ["train.workers"])
    assert "train.workers" in str(ei.value)


def test_override_without_equals_raw():
    with pytest.raises(ConfigError):
        apply_override({}, "justtext")


# --- file errors -------------------------------------------------------------------------------

def test_missing_config_file(tmp_path):
    p = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as ei:
        load(p)
    assert str(p) in str(ei.value)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_yaml(tmp_path, text):
    p = _write(tmp_path, text, "list.yaml")
    with pytest.raises(ConfigError) as ei:
        load(p)
    assert str(p) in str(ei.value)


def test_invalid_yaml_names_file(tmp_path):
    p = _write(tmp_path, "data: [unclosed\n", "bad.yaml")
    with pytest.raises(ConfigError) as ei:
        load(p)
    assert str(p) in str(ei.value)


def test_empty_file_gives_defaults_in_a_folder_named_after_it(tmp_path):
    """A user's config that sets no output_dir must never run into (and overwrite) runs/demo."""
    p = _write(tmp_path, "", "empty.yaml")
    assert load(p) == Config(output_dir="runs/empty")
    q = _write(tmp_path, "train: {epochs: 1}\n", "my-run.yaml")
    assert load(q).output_dir == "runs/my-run"
    assert load(q, ["output_dir=elsewhere"]).output_dir == "elsewhere"
    assert load(demo_config_path()).output_dir == "runs/demo"


def test_list_override_parses_as_list_of_strings():
    cfg = load(None, ["train.lora.target_modules=[q_proj,v_proj]"])
    assert cfg.train.lora.target_modules == ["q_proj", "v_proj"]
    cfg = load(None, ["train.lora.target_modules=[q_proj, v_proj]", "student.keep_layers=[0,2]"])
    assert cfg.train.lora.target_modules == ["q_proj", "v_proj"] and cfg.student.keep_layers == [0, 2]
    # text fields stay verbatim, brackets and all
    assert load(None, ["data.system_prompt=[draft] be brief"]).data.system_prompt == "[draft] be brief"


def test_task_on_the_command_line_wins_over_the_files_task_field():
    cfg = load(demo_config_path(), ["data.task=math"])
    assert cfg.data.task == "math" and cfg.data.task_field is None
    # set both on the command line: the user asked for both, so say which to clear
    with pytest.raises(ConfigError, match=r"data.task=math and --set data.task_field=kind are both set.*"
                                          r"data.task_field=null"):
        load(demo_config_path(), ["data.task=math", "data.task_field=kind"])


@pytest.mark.parametrize("key", ["output_dir", "data.path"])
def test_s3_paths_load_and_other_schemes_are_refused_intact(key):
    cfg = load(None, [f"{key}=s3://bucket/runs/x"])
    assert (cfg.output_dir if key == "output_dir" else cfg.data.path) == "s3://bucket/runs/x"
    with pytest.raises(ConfigError) as ei:
        load(None, [f"{key}=gs://bucket/runs/x"])
    msg = str(ei.value)
    assert "gs://bucket/runs/x: only local paths and s3:// are supported" in msg and "gs:/b" not in msg
    assert "(got {" not in msg  # a check over the whole config names its values, not the whole config


def test_openai_teacher_needs_a_base_url():
    with pytest.raises(ConfigError, match="teacher.engine is 'openai' but teacher.base_url is empty"):
        load(None, ["teacher.engine=openai", "teacher.model=deepseek-chat"])
    cfg = load(None, ["teacher.engine=openai", "teacher.base_url=http://127.0.0.1:1/v1",
                      "student.init=pretrained", "student.model=some/student"])  # prune needs a local teacher
    assert cfg.teacher.api_key_env == "OPENAI_API_KEY"


# --- dump round trip ---------------------------------------------------------------------------

def test_dump_round_trip(tmp_path):
    cfg = load(demo_config_path(), ["train.lora.enabled=true", "student.keep_layers=[1, 2]",
                                    "data.system_prompt=Be brief.", "generation.top_p=0.9"])
    p = _write(tmp_path, cfg.dump(), "dumped.yaml")
    again = load(p)
    assert again.model_dump() == cfg.model_dump()
    assert again.train.lora.enabled is True
    assert again.student.keep_layers == [1, 2]


def test_dump_lists_every_field():
    dumped = yaml.safe_load(Config().dump())
    assert set(dumped) == CONFIG_KEYS
    assert set(dumped["train"]) == set(rc.TrainConfig.model_fields)
    assert set(dumped["data"]["split"]) == {"validation", "test"}


def test_text_overrides_stay_verbatim():
    """Text fields take --set values as written: no YAML mapping, date, bool or comment surprises."""
    from raydistill.config import load

    cfg = load(None, ["data.prompt_template=Question: {question}", "data.system_prompt=# Math tutor",
                      "output_dir=2024-05-01", "data.id_field=no", "data.reference_field=null",
                      "teacher.engine=hf", "train.epochs=2"])
    assert cfg.data.prompt_template == "Question: {question}"
    assert cfg.data.system_prompt == "# Math tutor"
    assert cfg.output_dir == "2024-05-01" and cfg.data.id_field == "no"
    assert cfg.data.reference_field is None and cfg.teacher.engine == "hf" and cfg.train.epochs == 2


def test_override_into_section_left_empty_in_yaml(tmp_path):
    from raydistill.config import load

    p = tmp_path / "c.yaml"
    p.write_text("data:\n")
    assert load(p, ["data.path=x.jsonl"]).data.path == "x.jsonl"


def test_max_new_tokens_must_leave_room_for_the_prompt():
    from raydistill.config import ConfigError, load

    with pytest.raises(ConfigError, match=r"generation.max_new_tokens \(4096\).*teacher.max_model_len \(1024\)"):
        load(None, ["generation.max_new_tokens=4096"])
    with pytest.raises(ConfigError, match=r"with --set generation.max_new_tokens=4096"):
        load(None, ["generation.max_new_tokens=4096"])


def test_label_map_values_are_checked_when_the_config_loads():
    """Not after three models have answered the evaluation prompts."""
    with pytest.raises(ConfigError, match=r"data.label_map\['1'\] = 'maybe' names no NLI label"):
        load(None, ['data.label_map={"0": entailment, "1": maybe}'])
    assert load(None, ['data.label_map={"0": entailment, "2": contradiction}']).data.label_map == {
        "0": "entailment", "2": "contradiction"}


def test_serve_settings_that_would_be_ignored_or_measure_a_burst_are_refused():
    from raydistill.config import ConfigError

    with pytest.raises(ConfigError, match="accelerator_type is 'H100' but gpus_per_replica is 0"):
        load(None, ["serve.teacher.accelerator_type=H100"])
    with pytest.raises(ConfigError, match="tensor_parallel_size is 4 but gpus_per_replica is 0"):
        load(None, ["serve.teacher.tensor_parallel_size=4"])
    with pytest.raises(ConfigError, match="gpus_per_replica"):
        load(None, ["serve.student.gpus_per_replica=2"])  # more than one GPU: tensor_parallel_size
    with pytest.raises(ConfigError, match=r"requests_per_level \(8\) must be at least twice .* \(16\)"):
        load(None, ["serve.bench.requests_per_level=8"])
    cfg = load(None, ["serve.teacher.gpus_per_replica=1", "serve.teacher.tensor_parallel_size=8",
                      "serve.teacher.accelerator_type=H100"])
    assert cfg.serve.teacher.tensor_parallel_size == 8


def test_served_latency_with_an_api_teacher_is_refused():
    from raydistill.config import ConfigError

    with pytest.raises(ConfigError, match="latency_source is 'serve' but teacher.engine is 'openai'"):
        load(None, ["eval.latency_source=serve", "teacher.engine=openai", "teacher.base_url=http://127.0.0.1:1/v1",
                    "teacher.model=x", "student.init=pretrained", "student.model=y"])


def test_every_engine_config_declares_the_gpu_engine_fields_with_their_defaults():
    """The vLLM-on-GPU settings live on the common engine type, so every engine config (teacher,
    eval) has them with the same defaults and code reads them without probing."""
    from raydistill.config import EngineConfig, EvalConfig, TeacherConfig

    defaults = {"pipeline_parallel_size": 1, "gpu_memory_utilization": 0.9, "accelerator_type": None}
    for kind in (EngineConfig, TeacherConfig, EvalConfig):
        engine = kind()
        for name, default in defaults.items():
            assert name in kind.model_fields and kind.model_fields[name].description, (kind.__name__, name)
            assert getattr(engine, name) == default, (kind.__name__, name)
    assert {EngineConfig, TeacherConfig, EvalConfig} >= {c for c in EngineConfig.__subclasses__()} | {EngineConfig}
    cfg = load(None, ["eval.pipeline_parallel_size=2", "eval.accelerator_type=H100"])
    assert cfg.eval.pipeline_parallel_size == 2 and cfg.eval.asks_gpu()
