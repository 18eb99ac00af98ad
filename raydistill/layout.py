"""The run folder: where each stage writes, in one place.

Stages find each other's outputs only through these paths (and ``raydistill.corpus`` for the
corpus contents), never by importing another stage (evaluate reuses generate's engine functions to
answer its prompts, not to find generate's outputs)::

    <output_dir>/
      config.yaml            resolved config of the last command
      corpus/                generate: prompts/ (the split), data/ and rejects/ (part-*.parquet), manifest.json
                             (local or s3://; see raydistill.corpus)
      baseline_student/      train (student.init=prune): the student before training
      train/                 train: metrics.jsonl, loss.png, summary.json, student_init.json, examples/
                             (tokenized, per split), ray/ (checkpoints; removed after a finished run
                             unless train.delete_checkpoints=false); local or s3://
      student/               train: the distilled student (HF folder; local or s3://)
      eval/                  evaluate: report.{json,md}, answers.parquet, *.png
      bench/                 bench-serve: serve.{json,md,png}, config.yaml
"""

from __future__ import annotations

from pathlib import Path

from .config import Config


def output_dir(cfg: Config) -> Path:
    return Path(cfg.output_dir)


def corpus_dir(cfg: Config) -> Path:
    return output_dir(cfg) / "corpus"


def train_dir(cfg: Config) -> Path:
    return output_dir(cfg) / "train"


def student_dir(cfg: Config) -> Path:
    return output_dir(cfg) / "student"


def eval_dir(cfg: Config) -> Path:
    return output_dir(cfg) / "eval"


def bench_dir(cfg: Config) -> Path:
    """Where `raydistill bench-serve` writes (serve.json, serve.md, serve.png, config.yaml)."""
    return output_dir(cfg) / "bench"


def pruned_baseline_dir(cfg: Config) -> Path:
    """Where train writes the pruned baseline student (student.init=prune)."""
    return output_dir(cfg) / "baseline_student"


def baseline_student_ref(cfg: Config) -> str:
    """The baseline (untrained) student: ``output_dir/baseline_student`` for init=prune, else the
    ``student.model`` reference as given (resolve it with ``raydistill.models.resolve_model``)."""
    if cfg.student.init == "prune":
        return str(pruned_baseline_dir(cfg))
    assert cfg.student.model is not None  # enforced by StudentConfig
    return cfg.student.model


def corpus_location(cfg: Config):
    """``corpus/`` as a ``storage.StoragePath`` (local or s3://, with ``storage.*`` settings)."""
    from .storage import storage_path

    return storage_path(cfg.output_dir, cfg.storage) / "corpus"
