"""What a model folder holds, by file name, and where raydistill keeps its models on this machine.

Shared by ``models`` (resolving references) and ``storage`` (copying model folders from S3), which
both need it and must not import each other. Standard library only.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

#: File name endings of weight files (safetensors, PyTorch, GGUF).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
#: What describes a model without its weights: config, generation config, tokenizer (fast, BPE,
#: SentencePiece, tiktoken) and chat template files, as names (globs) at the top of the model folder
#: (a subfolder such as Llama's ``original/`` holds weights, never these). ``model_metadata`` fetches
#: only these; they are kilobytes to a few MB where the weights are up to ~800 GB.
METADATA_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "vocab.txt",
                  "merges.txt", "spiece.model", "sentencepiece.bpe.model", "*.tiktoken", "chat_template.jinja",
                  "chat_template.json")


def is_metadata_file(name: str) -> bool:
    """True when ``name`` (a path relative to the model folder, ``/``-separated) is one of
    ``METADATA_FILES`` at the folder's top level."""
    return "/" not in name and any(fnmatch.fnmatchcase(name, pattern) for pattern in METADATA_FILES)


def cache_dir() -> Path:
    """Root of raydistill's cache (``$RAYDISTILL_CACHE`` or ``~/.cache/raydistill``)."""
    return Path(os.environ.get("RAYDISTILL_CACHE", Path.home() / ".cache" / "raydistill"))
