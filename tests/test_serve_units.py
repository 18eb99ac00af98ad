"""The serve app's engine settings per arm (no Ray, no vLLM): what reaches ray.serve.llm's LLMConfig."""

from raydistill.config import load
from raydistill.serve.app import llm_config


def test_cpu_arm_gets_the_vllm_cpu_env_and_one_cpu_bundle():
    arm = load(None, ["serve.student.kv_cache_gib=1", "serve.student.cpus_per_replica=2"]).serve.student
    c = llm_config("student", "/m", arm)
    assert c["engine_kwargs"] == {"dtype": "float32", "max_model_len": 1024, "enforce_eager": True}
    assert c["placement_group_config"] == {"bundles": [{"CPU": 2.0}]}
    assert c["runtime_env"]["env_vars"]["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert c["deployment_config"] == {"num_replicas": 1, "max_ongoing_requests": 8, "max_queued_requests": 16}


def test_gpu_arms_keep_one_node_per_replica_and_pass_no_local_env():
    cfg = load(None, ["serve.teacher.gpus_per_replica=1", "serve.teacher.tensor_parallel_size=8",
                      "serve.teacher.accelerator_type=H100", "serve.student.gpus_per_replica=0.5"])
    teacher = llm_config("teacher", "deepseek-ai/x", cfg.serve.teacher)
    assert teacher["engine_kwargs"]["tensor_parallel_size"] == 8
    assert teacher["engine_kwargs"]["dtype"] == "auto"  # vLLM picks float16 where bfloat16 is missing
    assert teacher["placement_group_config"] == {"bundles": [{"GPU": 1, "CPU": 1.0}] + [{"GPU": 1}] * 7,
                                                 "strategy": "STRICT_PACK"}
    assert teacher["accelerator_type"] == "H100"
    assert "runtime_env" not in teacher  # this machine's core binding and HF_HUB_OFFLINE stay here
    student = llm_config("student", "s3://b/run/student", cfg.serve.student)
    assert student["placement_group_config"] == {"bundles": [{"GPU": 0.5, "CPU": 1.0}]}
    assert student["engine_kwargs"]["gpu_memory_utilization"] == 0.45  # half of the GPU, as its share
