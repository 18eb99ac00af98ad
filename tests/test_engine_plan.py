"""The vLLM teacher's Ray Data plan: the prompt tokenizer in front of the engine replicas scales
with them (it was one actor of 0.25 CPU for any number of teacher replicas)."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("replicas", [1, 8])
def test_prompt_tokenizer_pool_follows_the_teacher_replicas(replicas):
    from raydistill.config import EngineConfig
    from raydistill.generate.common import TOKENIZER_CPUS, prompt_tokenizer_pool

    pool = prompt_tokenizer_pool(EngineConfig(replicas=replicas))
    assert (pool["compute"].min_size, pool["compute"].max_size) == (1, replicas)
    assert pool["num_cpus"] == TOKENIZER_CPUS == 0.25


def test_built_vllm_plan_has_a_tokenizer_pool_per_replica(tiny_model, ray_local):
    """The plan `_vllm_outputs` builds (nothing runs): its _PromptTokenizer stage autoscales from
    1 to teacher.replicas actors."""
    import ray

    from raydistill.config import EngineConfig, GenerationConfig
    from raydistill.generate.vllm_engine import _PromptTokenizer, _vllm_outputs

    engine = EngineConfig(engine="vllm", replicas=6, batch_size=4, max_model_len=128)
    ds = _vllm_outputs(ray.data.range(4), str(tiny_model), engine, GenerationConfig(), gpu=False)
    ops, stack = [], [ds._logical_plan.dag]
    while stack:
        op = stack.pop()
        ops.append(op)
        stack.extend(op.input_dependencies)
    tokenizers = [op for op in ops if getattr(op, "fn", None) is _PromptTokenizer]
    assert len(tokenizers) == 1, [type(op).__name__ for op in ops]
    compute = tokenizers[0].compute
    assert (compute.min_size, compute.max_size) == (1, 6)
    assert tokenizers[0].ray_remote_args["num_cpus"] == 0.25
