"""The resource precheck (raydistill.resources): the arithmetic of what each stage asks for, the
packing onto live and autoscaled nodes, and, for real, a too-big run on a 2-CPU `ray start
--head` that fails in seconds with both numbers instead of hanging on "pending: 1.25 CPU"."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from raydistill.config import load
from raydistill.resources import (
    Capacity,
    NodeType,
    check,
    local_cpus_needed,
    node_types_from_gcs,
    node_types_from_launcher,
    place,
    stage_asks,
)

from ._ray_head import ray_head

TWO_CPU = Capacity([{"CPU": 2.0}])


def _cfg(*sets: str):
    return load(None, list(sets))


def test_generation_ask_counts_replicas_tokenizer_and_data_tasks():
    cfg = _cfg("teacher.replicas=4", "teacher.cpus_per_replica=1.25")
    (ask,) = stage_asks(cfg, "generate")
    assert ask.total() == {"CPU": 4 * 1.25 + 0.25 + 1.0}
    (problem,) = check(cfg, ("generate",), TWO_CPU)
    assert problem.startswith("generate needs 4 engine replicas × 1.25 CPU + 1 prompt tokenizer × 0.25 CPU "
                              "+ 1 CPU for Ray Data tasks = 6.25 CPU, but the cluster has 2 CPU (1 node) and "
                              "cannot scale (no autoscaler)")
    assert "teacher.replicas or teacher.cpus_per_replica" in problem
    # The default vLLM generation (1 replica of 1 CPU) does not fit 2 CPUs either: 1.25 CPU of
    # actors leaves 0.75 CPU, less than one Ray Data task needs: the hang users met.
    assert check(_cfg(), ("generate",), TWO_CPU)
    # hf and openai engines: no tokenizer actor
    assert stage_asks(_cfg("teacher.engine=hf", "teacher.replicas=2", "teacher.gpus_per_replica=0.5"),
                      "generate")[0].total() == {"CPU": 3.0, "GPU": 1.0}
    assert check(_cfg("teacher.engine=hf"), ("generate",), TWO_CPU) == []


def test_vllm_on_gpus_asks_one_bundle_per_tensor_and_pipeline_rank():
    cfg = _cfg("teacher.tensor_parallel_size=4", "teacher.pipeline_parallel_size=2", "teacher.replicas=2",
               "teacher.accelerator_type=H100")
    (ask,) = stage_asks(cfg, "generate", cluster_gpus=8)
    replica = ask.demands[0]
    assert len(replica.bundles) == 8 and replica.bundles[0] == {"CPU": 1.0, "GPU": 1.0, "accelerator_type:H100": 0.001}
    assert ask.total()["GPU"] == 16
    h100 = {"CPU": 192.0, "GPU": 8.0, "accelerator_type:H100": 1.0}
    assert check(cfg, ("generate",), Capacity([{"CPU": 8.0}, h100, dict(h100)])) == []
    (problem,) = check(cfg, ("generate",), Capacity([{"CPU": 8.0}, h100]))
    assert "8 bundles of 1 CPU, 1 GPU, H100" in problem and "= 17.25 CPU, 16 GPU, but" in problem and "the cluster has 200 CPU, 8 GPU (2 nodes)" in problem
    # the wrong accelerator type on every node: no node can hold one bundle
    a100 = {"CPU": 96.0, "GPU": 8.0, "accelerator_type:A100": 1.0}
    (problem,) = check(cfg, ("generate",), Capacity([a100, dict(a100)]))
    assert "one engine replica needs 1 CPU, 1 GPU, H100 on one node" in problem and "A100" in problem
    # tensor parallelism or an accelerator type means GPUs even before the autoscaler has added any
    # GPU node (a group at min_workers 0): the replica asks for GPUs, so the autoscaler adds one
    assert stage_asks(cfg, "generate", cluster_gpus=0)[0].total()["GPU"] == 16
    grows = Capacity([{"CPU": 8.0}], [NodeType("gpu_teacher", h100, 2)], limits="cluster/aws.yaml")
    assert check(cfg, ("generate",), grows) == []
    assert place(stage_asks(cfg, "generate", cluster_gpus=0)[0], grows)[1] == {"gpu_teacher": 2}
    # without GPU settings and without GPUs in the cluster, vLLM runs on CPUs (generate/answer.py's rule)
    assert "GPU" not in stage_asks(_cfg("teacher.replicas=2"), "generate", cluster_gpus=0)[0].total()
    assert stage_asks(_cfg("teacher.replicas=2"), "generate", cluster_gpus=1)[0].total()["GPU"] == 2


def test_train_evaluate_and_serve_asks():
    cfg = _cfg("train.workers=4", "train.cpus_per_worker=2", "train.use_gpu=true")
    (ask,) = stage_asks(cfg, "train")
    assert ask.total() == {"CPU": 9.0, "GPU": 4.0}
    assert "train needs 4 training workers × 2 CPU, 1 GPU + 1 CPU for Ray Data tasks = 9 CPU, 4 GPU" in ask.describe()
    # train.workers >= the logical CPUs leaves none for Ray Data: a deadlock, caught
    (problem,) = check(_cfg("train.workers=2"), ("train",), TWO_CPU)
    assert "= 3 CPU" in problem and "train.workers or train.cpus_per_worker" in problem
    # evaluate: the teacher (teacher.* resources on eval.engine), then the students (eval.*), one at a time
    teacher, students = stage_asks(_cfg("teacher.replicas=3", "eval.engine=hf", "eval.replicas=1"), "evaluate")
    assert teacher.total() == {"CPU": 4.0} and students.total() == {"CPU": 2.0}
    # serve: both arms at once; tensor parallel replicas are several bundles
    cfg = _cfg("serve.teacher.replicas=2", "serve.teacher.gpus_per_replica=1", "serve.teacher.tensor_parallel_size=2",
               "serve.teacher.cpus_per_replica=4", "serve.student.gpus_per_replica=0.5")
    (ask,) = stage_asks(cfg, "serve")
    # + 1 CPU per replica: Ray Serve LLM merges its replica actor into the first bundle
    assert ask.total() == {"CPU": 2 * (4 + 1) + (1 + 1), "GPU": 4.5}
    assert ask.demands[0].bundles == ({"GPU": 1.0, "CPU": 5.0}, {"GPU": 1.0})
    # the default serve config (two 1-CPU arms) needs 4 CPUs: it would hang on a 2-CPU cluster
    (problem,) = check(_cfg(), ("serve",), TWO_CPU)
    assert "= 4 CPU, but the cluster has 2 CPU" in problem


def test_autoscaling_capacity_and_packing():
    cfg = _cfg("teacher.engine=hf", "teacher.replicas=3", "teacher.cpus_per_replica=2")  # 3 × 2 + 1 = 7 CPU
    head = {"CPU": 1.0}
    grows = Capacity([head], [NodeType("cpu_node", {"CPU": 2.0}, 4)], limits="test.yaml")
    assert check(cfg, ("generate",), grows) == []
    unplaced, added = place(stage_asks(cfg, "generate")[0], grows)
    assert unplaced == [] and added == {"cpu_node": 3}  # one per replica; the head's CPU runs Ray Data's tasks
    small = Capacity([head], [NodeType("cpu_node", {"CPU": 2.0}, 2)], limits="test.yaml")
    (problem,) = check(cfg, ("generate",), small)
    assert ("the cluster has 1 CPU (1 node) and can scale to 5 CPU (cpu_node: 2 CPU × up to 2 more; "
            "limits from test.yaml)") in problem and "= 7 CPU" in problem
    # a cluster-wide max_workers caps the node types
    capped = Capacity([head], [NodeType("cpu_node", {"CPU": 2.0}, None)], limits="t", max_new_nodes=2)
    assert check(cfg, ("generate",), capped)
    assert check(cfg, ("generate",), Capacity([head], [NodeType("cpu_node", {"CPU": 2.0}, None)], limits="t")) == []
    # packing, not sums: 3 replicas of 1.5 CPU + 1 CPU of Ray Data tasks = 5.5 CPU do not fit three
    # 2-CPU nodes (6 CPU): each keeps 0.5 CPU, and a task needs a whole one
    cfg = _cfg("teacher.engine=hf", "teacher.replicas=3", "teacher.cpus_per_replica=1.5")
    (problem,) = check(cfg, ("generate",), Capacity([{"CPU": 2.0}] * 3))
    assert "= 5.5 CPU, but the cluster has 6 CPU (3 nodes)" in problem
    assert check(cfg, ("generate",), Capacity([{"CPU": 2.0}, {"CPU": 2.0}, {"CPU": 2.5}])) == []
    assert check(cfg, ("generate",), Capacity([{"CPU": 3.0}, {"CPU": 3.0}])) == []
    # one unit bigger than any node: said so
    (problem,) = check(_cfg("teacher.engine=hf", "teacher.cpus_per_replica=4"), ("generate",), grows)
    assert "one engine replica needs 4 CPU on one node, and no node has or can have that (the largest: 2 CPU)" in problem


def test_autoscaler_limits_from_a_launcher_yaml_and_the_gcs_cluster_config():
    config = {"max_workers": 5, "head_node_type": "head",
              "available_node_types": {"head": {"resources": {"CPU": 4}, "max_workers": 0},
                                       "teacher_gpu": {"resources": {"CPU": 192, "GPU": 8, "memory": 1e12},
                                                       "min_workers": 0, "max_workers": 2},
                                       "train_gpu": {"resources": {"CPU": 96, "GPU": 8}, "max_workers": 4},
                                       "unsized": {"node_config": {}, "max_workers": 3}}}
    types, cap = node_types_from_launcher(config, {"teacher_gpu": 1})
    assert [(t.name, t.resources, t.max_new) for t in types] == [
        ("teacher_gpu", {"CPU": 192.0, "GPU": 8.0}, 1), ("train_gpu", {"CPU": 96.0, "GPU": 8.0}, 4)]
    assert cap == 4  # 5 workers at most, one is live
    from ray.core.generated import autoscaler_pb2

    gcs = autoscaler_pb2.ClusterConfig(node_group_configs=[
        autoscaler_pb2.NodeGroupConfig(name="gpu", resources={"CPU": 8, "GPU": 1}, min_count=0, max_count=-1),
        autoscaler_pb2.NodeGroupConfig(name="cpu", resources={"CPU": 4}, min_count=0, max_count=3),
        autoscaler_pb2.NodeGroupConfig(name="off", resources={"CPU": 4}, max_count=0)])
    assert [(t.name, t.resources, t.max_new) for t in node_types_from_gcs(gcs, {"cpu": 1})] == [
        ("gpu", {"CPU": 8.0, "GPU": 1.0}, None), ("cpu", {"CPU": 4.0}, 2)]


def test_a_private_local_ray_is_sized_to_the_largest_stage():
    assert local_cpus_needed(_cfg("train.workers=8"), ("generate", "train")) == 9
    assert local_cpus_needed(_cfg(), ("generate",)) == 3  # 2.25 rounded up
    (problem,) = check(_cfg("train.use_gpu=true"), ("train",), Capacity([{"CPU": 8.0}], local=True))
    assert "this machine's private local Ray has 8 CPU, 0 GPU (1 node)" in problem and "RAY_ADDRESS" in problem


def test_ensure_ray_sizes_a_private_local_ray(tmp_path):
    """Before: a local run with train.workers = max(8, cores) got that many logical CPUs, all taken
    by the workers, and Ray Data's tasks waited forever. Now the private Ray gets one more; a GPU
    ask on this GPU-less machine fails with both numbers."""
    n = max(8, os.cpu_count() or 1)
    code = ("import ray; from raydistill.config import load; from raydistill.resources import ResourceError, ensure_ray\n"
            "try:\n"
            "    ensure_ray(load(None, ['train.use_gpu=true']), ('train',))\n"
            "except ResourceError as e:\n"
            "    print('GPU:', ' '.join(str(e).split()))\n"
            "ray.shutdown()\n"
            f"ensure_ray(load(None, ['train.workers={n}']), ('generate', 'train'))\n"
            "print('CPU:', int(ray.cluster_resources()['CPU']))\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=240,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert f"CPU: {n + 1}" in lines
    gpu = next(line for line in lines if line.startswith("GPU:"))
    assert f"train needs 2 training workers × 1 CPU, 1 GPU + 1 CPU for Ray Data tasks = 3 CPU, 2 GPU, but this " \
           f"machine's private local Ray has {n} CPU, 0 GPU (1 node)" in gpu


def test_too_big_run_fails_fast_on_a_2_cpu_head(tmp_path):
    """A real 2-CPU `ray start --head`: `raydistill run` asking for 4 engine replicas × 1.25 CPU
    and 2 training workers exits 2 in seconds, naming both numbers of both stages, and starts
    no stage (nothing but config.yaml is written)."""
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(f"output_dir: {tmp_path / 'out'}\nteacher:\n  replicas: 4\n  cpus_per_replica: 1.25\n")
    with ray_head(2) as head:
        env = dict(head.env, RAY_ADDRESS=head.address)
        t0 = time.perf_counter()
        out = subprocess.run([str(Path(sys.executable).with_name("raydistill")), "run", str(cfg_file)],
                             capture_output=True, text=True, env=env, timeout=180, cwd=tmp_path)
        elapsed = time.perf_counter() - t0
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
    err = " ".join(out.stderr.split())
    assert ("generate needs 4 engine replicas × 1.25 CPU + 1 prompt tokenizer × 0.25 CPU + 1 CPU for Ray Data "
            "tasks = 6.25 CPU, but the cluster has 2 CPU (1 node) and cannot scale (no autoscaler)") in err
    assert "train needs 2 training workers × 1 CPU + 1 CPU for Ray Data tasks = 3 CPU" in err
    assert "=== stage" not in out.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.yaml"]
    assert elapsed < 90, elapsed


def test_a_strict_pack_replica_needs_one_node_and_units_go_to_the_smallest_node_type():
    """Serve's tensor-parallel teacher is one STRICT_PACK placement group: its 8 bundles must share a
    node (8 GPUs spread over two 4-GPU nodes would hang); the students' single bundles may go
    anywhere, and a new node is the smallest type that holds the piece (as the autoscaler prefers)."""
    cfg = _cfg("serve.teacher.tensor_parallel_size=8", "serve.teacher.gpus_per_replica=1",
               "serve.teacher.accelerator_type=H200", "serve.student.gpus_per_replica=1", "serve.student.replicas=2")
    h200_4 = {"CPU": 96.0, "GPU": 4.0, "accelerator_type:H200": 1.0}
    (problem,) = check(cfg, ("serve",), Capacity([h200_4, dict(h200_4), {"CPU": 8.0, "GPU": 2.0}]))
    assert "1 teacher replica × 2 CPU, 8 GPU, H200 in 1 bundle of 2 CPU, 1 GPU, H200 + 7 bundles of 1 GPU, H200 on one node" in problem
    # one 8×H200 node and one 8×A100 node: the students take the A100s, the teacher the whole H200 node
    h200 = {"CPU": 192.0, "GPU": 8.0, "accelerator_type:H200": 1.0}
    a100 = {"CPU": 96.0, "GPU": 8.0, "accelerator_type:A100": 1.0}
    assert check(cfg, ("serve",), Capacity([{"CPU": 0.0}], [NodeType("gpu_teacher", h200, 1),
                                                            NodeType("gpu_train", a100, 1)], limits="t")) == []
    # training (no accelerator type) makes the autoscaler add the smaller GPU node type
    train = _cfg("train.workers=8", "train.use_gpu=true", "train.cpus_per_worker=8")
    grows = Capacity([{"CPU": 0.0}], [NodeType("gpu_teacher", h200, 2), NodeType("gpu_train", a100, 2)], limits="t")
    assert place(stage_asks(train, "train")[0], grows)[1] == {"gpu_train": 1}
    # a wrong accelerator type names the field to change and the types the cluster has
    (problem,) = check(_cfg("teacher.tensor_parallel_size=8", "teacher.accelerator_type=H200"), ("generate",),
                       Capacity([{"CPU": 8.0}, {"CPU": 192.0, "GPU": 8.0, "accelerator_type:H100": 1.0}]))
    assert "set teacher.accelerator_type to one of them" in problem and "(the cluster's: H100)" in problem


def test_train_accelerator_type_keeps_training_off_an_idle_teacher_node():
    """Without train.accelerator_type the training workers take any free GPUs, such as an idle
    H200 teacher node the autoscaler has not released yet; with it they ask for the type as Ray
    Train's own ScalingConfig does (the check counts the bundle the trainer passes), so the
    autoscaler adds the training group instead, and a type the cluster lacks names the field."""
    from raydistill.train.stage import scaling_config

    h200 = {"CPU": 192.0, "GPU": 8.0, "accelerator_type:H200": 1.0}
    a100 = {"CPU": 96.0, "GPU": 8.0, "accelerator_type:A100": 1.0}
    sets = ("train.workers=8", "train.use_gpu=true", "train.cpus_per_worker=8")
    idle_teacher = Capacity([{"CPU": 0.0}, dict(h200)], [NodeType("gpu_train", a100, 2)], limits="t")
    assert place(stage_asks(_cfg(*sets), "train")[0], idle_teacher)[1] == {}  # fits the idle H200 node
    cfg = _cfg(*sets, "train.accelerator_type=A100")
    (ask,) = stage_asks(cfg, "train")
    assert ask.demands[0].bundles[0] == {"CPU": 8.0, "GPU": 1.0, "accelerator_type:A100": 0.001}
    for c in (cfg, _cfg(*sets), _cfg("train.cpus_per_worker=2")):  # what Ray Train reserves per worker
        assert stage_asks(c, "train")[0].demands[0].bundles[0] == scaling_config(c.train)._resources_per_worker_not_none
    assert place(ask, idle_teacher)[1] == {"gpu_train": 1}
    (problem,) = check(cfg, ("train",), Capacity([{"CPU": 8.0}, dict(h200)]))
    assert "set train.accelerator_type to one of them" in problem and "(the cluster's: H200)" in problem


def test_train_accelerator_type_needs_use_gpu():
    import pytest

    from raydistill.config import ConfigError

    with pytest.raises(ConfigError, match="accelerator_type is 'A100' but use_gpu is false"):
        _cfg("train.accelerator_type=A100")
