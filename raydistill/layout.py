"""The run folder: where each stage writes, in one place.

Stages find each other's outputs only through these locations (and ``raydistill.corpus`` for the
corpus contents), never by importing another stage (evaluate reuses generate's engine functions to
answer its prompts, not to find generate's outputs). Every ``*_location`` function returns a
``storage.StoragePath`` (local or ``s3://``, with the ``storage.*`` settings); a stage that needs a
local ``Path`` takes it from there (``.local()``). No other module spells a folder name below::

    <output_dir>/            output_location
      config.yaml            resolved config of the last command
      corpus/                corpus_location. generate: prompts/ (the split), data/ and rejects/
                             (part-*.parquet), manifest.json (see raydistill.corpus)
      baseline_student/      baseline_location. train (student.init=prune): the student before training
      train/                 train_location. train: metrics.jsonl, loss.png, summary.json, student_init.json,
                             examples/ (examples_location: tokenized, per split), ray/ (ray_train_location:
                             Ray Train's run folder with the checkpoints; removed after a finished run
                             unless train.delete_checkpoints=false)
      student/               student_location. train: the distilled student (HF folder)
      eval/                  eval_location. evaluate: report.{json,md}, answers.parquet, *.png
      eval.partial/          eval_partial_location. evaluate: eval/ while it is built (answers.parquet
                             first); renamed (uploaded, for s3://) to eval/ when complete, and left with
                             the answers when a later step fails
      serve/                 serve_location. serve: config.yaml
      bench/                 bench_location. bench-serve: serve.{json,md,png}, config.yaml
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import Config

if TYPE_CHECKING:
    from .storage import StoragePath


def output_location(cfg: Config) -> StoragePath:
    """``output_dir`` itself (local paths made absolute)."""
    from .storage import storage_path

    return storage_path(cfg.output_dir, cfg.storage)


def corpus_location(cfg: Config) -> StoragePath:
    """``corpus/``: what generate writes (see ``raydistill.corpus``)."""
    return output_location(cfg) / "corpus"


#: in ``baseline_student/``: what the pruned baseline was made from, the layers it kept and, for
#: ``student.prune.method=importance``, every teacher layer's score (written by train, read by evaluate)
BASELINE_RECIPE = "raydistill_student_init.json"


def baseline_location(cfg: Config) -> StoragePath:
    """``baseline_student/``: the pruned student before training (student.init=prune)."""
    return output_location(cfg) / "baseline_student"


def baseline_pruning(cfg: Config) -> dict | None:
    """How the pruned baseline student was made, from its ``BASELINE_RECIPE``: ``prune_method``
    (``stride`` or ``importance``), the teacher layers ``kept`` and, for importance, every teacher
    layer's Block Influence ``scores`` (else None); None when the student is not pruned or the
    record is absent. Read by train (``train/student_init.json``) and evaluate (``report.json``)."""
    import json

    record = baseline_location(cfg) / BASELINE_RECIPE
    if cfg.student.init != "prune" or not record.is_file():
        return None
    recipe = json.loads(record.read_text())
    return {"prune_method": (recipe.get("prune") or {}).get("method", "stride"), "kept": recipe.get("kept"),
            "scores": recipe.get("scores")}


def train_location(cfg: Config) -> StoragePath:
    """``train/``: training's records, metrics and plots (``train.stage``)."""
    return output_location(cfg) / "train"


def examples_location(cfg: Config, split: str | None = None) -> StoragePath:
    """``train/examples/``: the tokenized examples; with ``split``, that split's folder."""
    folder = train_location(cfg) / "examples"
    return folder / split if split else folder


def ray_train_location(cfg: Config) -> StoragePath:
    """``train/ray/``: Ray Train's run folder (its ``RunConfig`` name is this folder's name),
    holding the checkpoints."""
    return train_location(cfg) / "ray"


def student_location(cfg: Config) -> StoragePath:
    """``student/``: the distilled student (HF folder)."""
    return output_location(cfg) / "student"


def eval_location(cfg: Config) -> StoragePath:
    """``eval/``: the finished evaluation (``report.json`` last)."""
    return eval_of(output_location(cfg))


def eval_of(run: StoragePath) -> StoragePath:
    """The ``eval/`` folder of the run whose output location is ``run`` (this run's, or another
    run's for ``eval.compare_to``)."""
    return run / "eval"


def eval_partial_location(cfg: Config) -> StoragePath:
    """``eval.partial/``: the evaluation while it is built, and its answers after a failure."""
    return output_location(cfg) / "eval.partial"


def serve_location(cfg: Config) -> StoragePath:
    """``serve/``: where `raydistill serve` writes its resolved config."""
    return output_location(cfg) / "serve"


def bench_location(cfg: Config) -> StoragePath:
    """``bench/``: where `raydistill bench-serve` writes (serve.json, serve.md, serve.png, config.yaml)."""
    return output_location(cfg) / "bench"


def baseline_student_ref(cfg: Config) -> str:
    """The baseline (untrained) student: ``baseline_location`` (its URI) for init=prune, else the
    ``student.model`` reference as given (resolve it with ``raydistill.models.resolve_model``)."""
    if cfg.student.init == "prune":
        return baseline_location(cfg).uri
    assert cfg.student.model is not None  # enforced by StudentConfig
    return cfg.student.model
