"""Every shipped YAML is found, classified and validated; the ``jobs/`` entry points stay light.

A recursive glob finds the YAML files of the repository (not .venv, runs, hidden or build folders).
Each one must be one of: a raydistill run config (``raydistill.config.load``), a Ray cluster-launcher
config (Ray's own schema, offline), a KubeRay object (RayCluster, RayJob, RayService: checked
structurally), a Ray Serve config (``ServeDeploySchema``) or a Ray runtime env (``RuntimeEnv``). A YAML
that is none of these fails, so a new file cannot slip in unvalidated. Light tests: no Ray instance.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from raydistill.config import load

from .helpers import REPO, SHIPPED, classify, rel, shipped_yaml

JOBS = REPO / "jobs"
KUBERAY_KINDS = ("RayCluster", "RayJob", "RayService")
#: What the rayproject/ray-llm image brings itself: the runtime env need not install these.
IN_RAY_LLM_IMAGE = {"ray", "torch", "transformers", "pyarrow", "pydantic", "pyyaml", "psutil"}


# --- the glob ------------------------------------------------------------------------------------

def test_the_glob_finds_every_kind_of_shipped_yaml():
    assert SHIPPED, "no YAML found: the recursive glob is broken"
    kinds = {}
    for p in SHIPPED:
        kinds.setdefault(classify(yaml.safe_load(p.read_text())), []).append(rel(p))
    assert None not in kinds, f"YAML files no check understands (add a check for them): {kinds.get(None)}"
    assert set(kinds) == {"run_config", "launcher", "kuberay", "serve", "runtime_env"}, kinds
    assert {"raydistill/demo/config.yaml", "jobs/configs/demo_cpu.yaml", "cluster/aws.yaml",
            "cluster/serve.yaml", "cluster/rayservice.yaml", "cluster/kuberay-raycluster.yaml",
            "cluster/kuberay-rayjob.yaml", "cluster/runtime_env.yaml"} <= {rel(p) for p in SHIPPED}


def test_the_glob_skips_venv_runs_and_hidden_folders(tmp_path, monkeypatch):
    from . import helpers

    for name in ("a/x.yaml", ".hidden/x.yaml", ".venv/x.yml", "runs/demo/config.yaml", "b/c/y.yml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}")
    monkeypatch.setattr(helpers, "REPO", tmp_path)
    assert [str(p.relative_to(tmp_path)) for p in shipped_yaml()] == ["a/x.yaml", "b/c/y.yml"]


def test_an_unknown_yaml_is_not_classified():
    assert classify({"name": "x", "steps": []}) is None
    assert classify(["a"]) is None
    assert classify({"output_dir": "s3://b/p", "teacher": {}}) == "run_config"
    assert classify({"pip": ["x"], "env_vars": {}}) == "runtime_env"


# --- each file, by kind ------------------------------------------------------------------------------

@pytest.mark.parametrize("path", SHIPPED, ids=rel)
def test_shipped_yaml_is_valid(path):
    raw = yaml.safe_load(path.read_text())
    kind = classify(raw)
    assert kind is not None, f"{rel(path)}: not a run config, cluster launcher, KubeRay object, Serve config or runtime env"
    {"run_config": check_run_config, "launcher": check_launcher, "kuberay": check_kuberay,
     "serve": check_serve_config, "runtime_env": check_runtime_env}[kind](path, raw)


def check_run_config(path: Path, raw: dict) -> None:
    cfg = load(path)
    if path.parent != JOBS / "configs":
        return
    # Job configs: outputs on shared storage, and a header comment with the exact submit command.
    assert cfg.output_dir.startswith("s3://"), f"{rel(path)}: a job's output_dir must be s3://, got {cfg.output_dir}"
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("# "))
    commands = [line for line in header if "ray job submit" in line]
    assert commands, f"{rel(path)}: its header comment gives no `ray job submit` command"
    for line in commands:
        argv = shlex.split(line[line.index("ray job submit"):])
        assert "--working-dir" in argv and "--" in argv, line
        if "--runtime-env" in argv:
            assert (REPO / argv[argv.index("--runtime-env") + 1]).is_file(), line
        entry = argv[argv.index("--") + 1:]
        assert entry[0] == "python" and (REPO / entry[1]).is_file(), f"{rel(path)}: no script {entry[1]}"
        assert entry[2] == rel(path), f"{rel(path)}: its command runs {entry[2]}"
        sets = [entry[i + 1] for i, a in enumerate(entry) if a == "--set"]
        assert load(REPO / entry[2], sets).output_dir.startswith("s3://"), line


def check_launcher(path: Path, raw: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    with pytest.MonkeyPatch.context() as mp:
        def refuse(*args, **kwargs):
            raise AssertionError(f"{rel(path)}: the schema check tried to reach the network {args}")
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        prepared = prepare_config(copy.deepcopy(raw))  # what `ray up` does before its own validate_config
        validate_config(prepared)
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"].get("CPU", 0) <= 2, f"{rel(path)}: the head should take (almost) no work: {head['resources']}"
    workers = {name: t for name, t in types.items() if name != raw["head_node_type"]}
    assert workers, f"{rel(path)}: no worker node types"
    for name, t in workers.items():
        assert 0 <= t.get("min_workers", 0) <= t["max_workers"], f"{rel(path)}: {name} min/max workers"
    assert raw.get("idle_timeout_minutes"), f"{rel(path)}: set idle_timeout_minutes"
    setup = raw.get("setup_commands", [])
    assert any("raydistill" in c for c in setup), f"{rel(path)}: setup_commands install no raydistill"
    # the dependencies installed beside a --no-deps raydistill are those of cluster/runtime_env.yaml
    shared = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())["pip"]
    listed = [shlex.split(c)[3:] for c in setup if c.startswith("pip install --quiet \"")]
    assert listed and _pip_names(listed[0]) == _pip_names(shared), f"{rel(path)}: {listed} vs runtime_env {shared}"
    gpu_groups = [t["resources"] for t in workers.values() if t["resources"].get("GPU")]
    assert len(gpu_groups) >= 2, f"{rel(path)}: want a teacher and a training GPU group"
    from raydistill.resources import node_types_from_launcher

    _check_job_configs_fit({k: float(v) for k, v in head["resources"].items()},
                           node_types_from_launcher(raw)[0], rel(path))


def _check_job_configs_fit(head: dict, types: list, where: str) -> None:
    """Every config of jobs/configs passes raydistill's own resource precheck (raydistill.resources)
    on this cluster as it starts (the head alone, every worker group at 0 nodes, the autoscaler's
    limits from the file), stage by stage; a GPU teacher or GPU training makes the autoscaler add a
    node of a GPU group (with the teacher's, or training's, accelerator type)."""
    from raydistill.resources import Capacity, check, place, stage_asks

    capacity = Capacity([head], types, limits=where)
    gpu_types = {t.name for t in types if t.resources.get("GPU")}
    resources_of = {t.name: t.resources for t in types}
    for cfg_path in sorted((JOBS / "configs").glob("*.yaml")):
        cfg = load(cfg_path)
        stages = ("generate", "train", "evaluate", "serve")
        assert check(cfg, stages, capacity) == [], f"{where}: {rel(cfg_path)} does not fit"
        (gen,) = stage_asks(cfg, "generate")
        added = place(gen, capacity)[1]
        if cfg.teacher.engine == "vllm" and cfg.teacher.asks_gpu():
            assert set(added) <= gpu_types and added, f"{where}: {rel(cfg_path)}'s teacher adds {added}"
            accel = cfg.teacher.accelerator_type
            if accel:
                assert all(resources_of[n].get(f"accelerator_type:{accel}")
                           for n in added), f"{where}: {rel(cfg_path)}'s teacher lands on {added}, not {accel}"
        if cfg.train.use_gpu:
            (train,) = stage_asks(cfg, "train")
            added = place(train, capacity)[1]
            assert set(added) & gpu_types, f"{where}: {rel(cfg_path)} trains on no GPU group"
            # the training group, even while an idle node of another GPU group is still up (a
            # teacher node the autoscaler has not released): train.accelerator_type must pin it
            accel = cfg.train.accelerator_type
            assert accel, f"{rel(cfg_path)}: set train.accelerator_type (the cluster has several GPU groups)"
            typed = {n for n in gpu_types if resources_of[n].get(f"accelerator_type:{accel}")}
            for other in gpu_types - typed:
                with_idle = Capacity([head, dict(resources_of[other])], types, limits=where)
                added = place(train, with_idle)[1]
                assert set(added) & gpu_types and set(added) & gpu_types <= typed, \
                    f"{where}: {rel(cfg_path)} trains on {added} beside an idle {other} node, not on {accel}"


def check_serve_config(path: Path, raw: dict) -> None:
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(raw)
    assert schema.applications, f"{rel(path)}: no application"


def _group_resources(group: dict, where: str) -> dict:
    """Ray resources of a KubeRay group: CPU and GPU from the container limits, custom resources from
    rayStartParams.resources."""
    containers = group["template"]["spec"]["containers"]
    assert containers, f"{where}: no container"
    limits = containers[0].get("resources", {}).get("limits", {})
    assert limits.get("cpu") and limits.get("memory"), f"{where}: set cpu and memory limits, got {limits}"
    cpu = str(limits["cpu"])
    num_cpus = group.get("rayStartParams", {}).get("num-cpus")  # what Ray is told, when it differs
    out = {"CPU": float(num_cpus if num_cpus is not None else (int(cpu[:-1]) / 1000 if cpu.endswith("m") else cpu)),
           "GPU": float(limits.get("nvidia.com/gpu", 0))}
    custom = group.get("rayStartParams", {}).get("resources")
    if custom:
        out.update(json.loads(json.loads(custom)))  # KubeRay's format: a JSON string inside quotes
    return out


def _check_ray_cluster_spec(spec: dict, where: str, autoscaling: bool) -> tuple[dict, list]:
    """Checks a RayCluster spec; returns (the head's Ray resources, the worker groups as
    ``resources.NodeType``s with up to maxReplicas nodes each)."""
    from raydistill.resources import NodeType

    head = _group_resources(spec["headGroupSpec"], f"{where} head")
    workers = spec.get("workerGroupSpecs") or []
    assert workers, f"{where}: no worker groups"
    groups = []
    for g in workers:
        name = f"{where} worker group {g.get('groupName')}"
        assert g.get("groupName"), name
        lo, hi = g["minReplicas"], g["maxReplicas"]
        assert 0 <= lo <= g.get("replicas", lo) <= hi, f"{name}: replicas {g.get('replicas')}, min {lo}, max {hi}"
        if hi > lo:
            assert spec.get("enableInTreeAutoscaling"), f"{name}: maxReplicas > minReplicas needs enableInTreeAutoscaling"
        groups.append(NodeType(g["groupName"], _group_resources(g, name), hi))
    if autoscaling:
        assert spec.get("enableInTreeAutoscaling") is True, f"{where}: autoscaling is off"
        assert any(g["minReplicas"] < g["maxReplicas"] for g in workers), f"{where}: no group can scale"
    return head, groups


def check_kuberay(path: Path, raw: dict) -> None:
    where = rel(path)
    assert raw["apiVersion"] == "ray.io/v1", f"{where}: apiVersion {raw['apiVersion']}"
    assert raw["kind"] in KUBERAY_KINDS, f"{where}: kind {raw['kind']}"
    assert raw["metadata"]["name"], where
    spec = raw["spec"]
    if raw["kind"] == "RayCluster":
        head, groups = _check_ray_cluster_spec(spec, where, autoscaling=True)
        _check_job_configs_fit(head, groups, where)
        assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", f"{where}: the head takes work"
    elif raw["kind"] == "RayJob":
        _check_ray_cluster_spec(spec["rayClusterSpec"], where, autoscaling=True)
        assert spec.get("shutdownAfterJobFinishes") is True, f"{where}: the job's cluster outlives it"
        entry = shlex.split(spec["entrypoint"])
        assert entry[0] == "python" and entry[1].startswith("jobs/") and (REPO / entry[1]).is_file(), \
            f"{where}: entrypoint {spec['entrypoint']} names no jobs/ script"
        assert (REPO / entry[2]).is_file(), f"{where}: entrypoint config {entry[2]} does not exist"
        sets = [entry[i + 1] for i, a in enumerate(entry) if a == "--set"]
        assert load(REPO / entry[2], sets).output_dir.startswith("s3://"), where
        env = yaml.safe_load(spec["runtimeEnvYAML"])
        # (a working_dir inside the image does not exist here: checked below, not by RuntimeEnv)
        check_runtime_env(path, {k: v for k, v in env.items() if k != "working_dir"})
        shared = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
        assert env["env_vars"] == shared["env_vars"], f"{where}: env_vars drifted from cluster/runtime_env.yaml"
        if "pip" in env:
            assert env["pip"] == shared["pip"], f"{where}: pip drifted from cluster/runtime_env.yaml"
        if not env["working_dir"].startswith(("s3://", "https://", "gs://")):
            # a folder of the image, uploaded by the submitter pod: the checkout cluster/Dockerfile copies
            image, target = _dockerfile()
            assert env["working_dir"] == target, f"{where}: working_dir {env['working_dir']} is not the image's checkout {target}"
            submitter = spec["submitterPodTemplate"]["spec"]["containers"][0]["image"]
            assert submitter == image, f"{where}: the submitter pod must run {image} to upload {target}"
    if raw["kind"] in ("RayCluster", "RayJob"):
        cluster = spec if raw["kind"] == "RayCluster" else spec["rayClusterSpec"]
        groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        images = {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
        assert images == {_dockerfile()[0]}, f"{where}: images {images}; raydistill is not on PyPI: use cluster/Dockerfile's"
    else:  # RayService: the Serve application and its cluster
        from ray.serve.schema import ServeDeploySchema

        ServeDeploySchema.model_validate(yaml.safe_load(spec["serveConfigV2"]))
        _check_ray_cluster_spec(spec["rayClusterConfig"], where, autoscaling=False)


def _dockerfile() -> tuple[str, str]:
    """(image tag from its `docker build -t` line, the folder it copies the checkout to) of cluster/Dockerfile."""
    text = (REPO / "cluster" / "Dockerfile").read_text()
    tag = re.search(r"docker build .*-t (\S+)", text).group(1)
    target = re.search(r"^COPY .*\s\.\s+(\S+)$", text, re.M).group(1)
    return tag, target


def _pip_names(specs) -> set[str]:
    return {re.split(r"[\[<>=!~ ;]", d, maxsplit=1)[0].lower() for d in specs}


def check_runtime_env(path: Path, raw: dict) -> None:
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**raw)  # Ray's own checks of each field
    for key, value in (raw.get("env_vars") or {}).items():
        if re.search(r"(^|_)(TOKEN|KEY|SECRET|PASSWORD)(_|$)", key):
            assert re.fullmatch(r"\$\{\w+\}", value), f"{rel(path)}: {key} holds a value; secrets come from ${{{key}}}"
    if "pip" not in raw:
        return
    names = _pip_names(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])
    pip = _pip_names(raw["pip"])
    assert pip <= names, f"{rel(path)}: pip installs what raydistill does not depend on: {pip - names}"
    assert pip == names - IN_RAY_LLM_IMAGE, f"{rel(path)}: missing dependencies {names - IN_RAY_LLM_IMAGE - pip}"


def test_the_launcher_check_catches_a_wrong_key():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    raw["available_node_types"]["gpu_train"]["min_worker"] = 1  # typo of min_workers
    with pytest.raises(Exception, match="min_worker"):
        validate_config(prepare_config(raw))


# --- jobs/ entry points ------------------------------------------------------------------------------

SCRIPTS = sorted(p for p in JOBS.glob("*.py") if not p.name.startswith("_"))


def test_jobs_exist_and_call_cli_commands():
    from raydistill.cli import app

    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    called = {}
    for p in SCRIPTS:
        m = re.search(r'^\s+run\("([\w-]+)"\)', p.read_text(), re.M)
        assert m, f"{rel(p)} calls no CLI command"
        called[p.stem] = m.group(1)
        assert m.group(1) in commands, f"{rel(p)}: raydistill has no command {m.group(1)}"
    assert {"pipeline", "generate", "train", "evaluate", "serve"} <= set(called)
    assert called["pipeline"] == "run"


def test_importing_every_job_module_loads_nothing_heavy():
    code = (
        "import importlib.util, json, sys\n"
        f"sys.path.insert(0, {str(JOBS)!r})\n"
        f"for p in {[str(p) for p in sorted(JOBS.glob('*.py'))]!r}:\n"
        "    spec = importlib.util.spec_from_file_location(p.rsplit('/', 1)[-1][:-3], p)\n"
        "    spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "import raydistill.cli, raydistill.config, raydistill.jobmode\n"  # what run() imports before a stage
        "print(json.dumps([m for m in ('vllm', 'torch', 'transformers', 'ray') if m in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_a_job_runs_the_command_which_logs_the_absolute_output_location(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("output_dir: rel/out\ndata: {path: nowhere.jsonl}\n")
    out = subprocess.run([sys.executable, str(JOBS / "generate.py"), str(cfg), "--set", "output_dir=rel/other"],
                         capture_output=True, text=True, cwd=tmp_path)
    # `raydistill generate` itself: the absolute location, the resolved config written there, the
    # missing data file reported, exit code 2
    assert f"output location: {tmp_path / 'rel' / 'other'}" in out.stderr, out.stderr[-2000:]
    assert out.returncode == 2 and "data file not found" in out.stderr, (out.returncode, out.stderr[-2000:])
    assert yaml.safe_load((tmp_path / "rel" / "other" / "config.yaml").read_text())["output_dir"] == "rel/other"


def test_a_bad_config_exits_2_naming_the_key_and_help_reads_as_the_script(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("teacher: {replicas: 0}\n")
    out = subprocess.run([sys.executable, str(JOBS / "pipeline.py"), str(cfg)], capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 2 and "teacher.replicas" in out.stderr
    help_ = subprocess.run([sys.executable, str(JOBS / "pipeline.py"), "--help"], capture_output=True, text=True)
    assert help_.returncode == 0 and "Run every stage" in help_.stdout
    assert "python jobs/pipeline.py [OPTIONS]" in help_.stdout
