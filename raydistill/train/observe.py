"""Training observability: the loss-curve PNG and optional MLflow logging.

The trainer writes one JSON object per optimizer step to ``train/metrics.jsonl``::

    {"step": int, "epoch": int, "loss": float, "ce": float, "kd": float | null, "lr": float,
     "grad_norm": float, "tokens": int, "tokens_per_s": float, "seconds": float,
     "val_loss": float}            # val_loss only on evaluation steps

Losses are mean nats per supervised token. ``read_metrics`` reads that file back (local or
``s3://``), ``plot_losses`` draws it, and ``MlflowLogger`` mirrors each record to MLflow when
``train.mlflow.enabled`` is set. MLflow is optional and not a dependency of raydistill:
``require_mlflow`` fails with the install command when it is missing.

matplotlib, mlflow and Ray are imported inside the functions that need them, so importing this
module stays light.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import math
import os
import tempfile
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..storage import StoragePath, storage_path

log = logging.getLogger(__name__)

MLFLOW_INSTALL = "pip install mlflow"


class MlflowMissingError(ImportError):
    """``train.mlflow.enabled`` is set but the ``mlflow`` package is not installed."""


def require_mlflow() -> None:
    """Raise ``MlflowMissingError`` (an ``ImportError``) naming ``pip install mlflow`` when the
    ``mlflow`` package cannot be imported in this Python environment. Call it on the driver before
    training starts, and again in the worker (its environment may differ)."""
    if importlib.util.find_spec("mlflow") is None:
        raise MlflowMissingError(
            "train.mlflow.enabled is true but the mlflow package is not installed in this Python "
            f"environment: run `{MLFLOW_INSTALL}` (on every node of a cluster, or add it to the job's "
            "runtime_env pip list), or set train.mlflow.enabled=false.")


def _as_storage(path: StoragePath | str | os.PathLike) -> StoragePath:
    return path if isinstance(path, StoragePath) else storage_path(path)


def read_metrics(path: StoragePath | str | os.PathLike) -> list[dict]:
    """Records of a ``metrics.jsonl`` (local or ``s3://``), in file order; blank lines skipped.

    Raises ``FileNotFoundError`` if absent, ``ValueError`` naming the file and line number for a
    line that is not a JSON object."""
    p = _as_storage(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p.uri}: no metrics file")
    records = []
    for n, line in enumerate(p.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p.uri}, line {n}: not JSON ({e.msg}): {line[:120]!r}") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{p.uri}, line {n}: expected a JSON object, got {type(rec).__name__}")
        records.append(rec)
    return records


def _number(value: Any) -> float:
    """A float, NaN for null / missing / non-finite values (matplotlib leaves gaps at NaN)."""
    if value is None or isinstance(value, bool):
        return math.nan
    v = float(value)
    return v if math.isfinite(v) else math.nan


def _last_per_step(metrics: list[dict]) -> list[dict]:
    """One record per step, sorted by step; a step recorded twice (the steps a resumed run
    repeated after its last checkpoint) keeps its later record."""
    by_step: dict[int, dict] = {}
    for i, rec in enumerate(metrics):
        missing = [k for k in ("step", "loss") if k not in rec]
        if missing:
            raise ValueError(f"metrics record {i}: missing field(s) {missing} (has {sorted(rec)})")
        by_step[int(rec["step"])] = rec
    return [by_step[s] for s in sorted(by_step)]


def plot_losses(metrics: list[dict], out_png: StoragePath | str | os.PathLike, title: str) -> None:
    """Draw the loss curves of a training run and write them as a PNG to ``out_png``.

    ``metrics``: the per-step records of ``metrics.jsonl`` (see the module docstring); each needs
    ``step`` and ``loss``; ``ce``, ``kd`` and ``val_loss`` are drawn when some record has a number
    there. x = optimizer step; y = loss in nats per token. Lines: train loss (solid), its ``ce``
    and ``kd`` parts (dashed, only when ``kd`` is present: for ``sequence_kd`` ce == loss), and
    validation loss as markers joined by a line. A step recorded twice keeps its last record;
    null and non-finite values leave a gap (counted in a note on the figure). Epoch boundaries are
    dotted vertical lines.

    ``out_png``: a ``StoragePath``, local path or ``s3://`` URI; written atomically through
    ``raydistill.storage``. Raises ``ValueError`` for no records or a record without step/loss.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics:
        raise ValueError(f"plot_losses({title!r}): no metrics records to plot")
    recs = _last_per_step(metrics)
    steps = [int(r["step"]) for r in recs]
    loss = [_number(r.get("loss")) for r in recs]
    ce = [_number(r.get("ce")) for r in recs]
    kd = [_number(r.get("kd")) for r in recs]
    val = [(s, _number(r.get("val_loss"))) for s, r in zip(steps, recs) if r.get("val_loss") is not None]
    has_kd = any(not math.isnan(v) for v in kd)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    marker = "o" if len(steps) <= 30 else None  # a lone step still shows up as a point
    ax.plot(steps, loss, color="tab:blue", lw=1.6, marker=marker, ms=3, label="train loss")
    if has_kd:
        ax.plot(steps, ce, color="tab:green", lw=1.1, ls="--", label="train ce (cross-entropy part)")
        ax.plot(steps, kd, color="tab:purple", lw=1.1, ls="--", label="train kd (divergence part)")
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], color="tab:orange", lw=1.2, marker="o", ms=5,
                label="validation loss")
    epochs = [r.get("epoch") for r in recs]
    for i in range(1, len(recs)):
        if epochs[i] is not None and epochs[i - 1] is not None and epochs[i] != epochs[i - 1]:
            ax.axvline(steps[i] - 0.5, color="gray", ls=":", lw=0.8)
    gaps = sum(math.isnan(v) for v in loss)
    if gaps:
        ax.text(0.01, 0.01, f"{gaps} step(s) with a missing or non-finite loss not drawn",
                transform=ax.transAxes, fontsize=8, color="tab:red")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    _as_storage(out_png).write_bytes(buf.getvalue())


def _mlflow_settings(mlflow_cfg: Mapping | Any | None) -> dict:
    if mlflow_cfg is None:
        return {}
    if hasattr(mlflow_cfg, "model_dump"):  # a raydistill.config.MlflowConfig
        return mlflow_cfg.model_dump()
    return dict(mlflow_cfg)


class MlflowLogger:
    """Per-step metrics of a training run to MLflow, from rank 0 only.

    ``mlflow_cfg``: ``train.mlflow`` as a dict (or the ``MlflowConfig``): ``enabled``,
    ``tracking_uri`` (None: ``MLFLOW_TRACKING_URI``, else mlflow's own default: mlflow 3.x uses
    ``sqlite:///mlflow.db`` and artifacts in ``./mlruns``, relative to the process's working
    directory, which in a Ray Train worker is not the driver's, so resolve it on the driver; a
    plain folder ``./mlruns`` (file store) is refused by mlflow 3.17 unless
    ``MLFLOW_ALLOW_FILE_STORE=true``; on a cluster use a tracking server ``http://...``),
    ``experiment`` (created if absent), optional ``artifact_location`` (where a newly created
    experiment keeps artifacts; mlflow's default ``./mlruns`` is again relative to the worker's
    working directory: in Ray Train V2 that is Ray's session folder). ``run_name``: the MLflow run's name.
    ``params``: the run's parameters (the resolved config as a nested dict; flattened to
    ``section/field`` keys).

    Disabled (``enabled`` false), it is a no-op: nothing is imported and every method returns at
    once. Enabled, it needs mlflow installed (``MlflowMissingError`` otherwise) and opens the run
    through Ray's ``ray.air.integrations.mlflow.setup_mlflow``, which in a Ray Train worker gives
    rank 0 the ``mlflow`` module and every other rank a no-op: construct it on every rank and call
    it everywhere. ``active`` says whether this process logs. Use as a context manager, or call
    ``close()``; a run left by an exception is marked FAILED.
    """

    def __init__(self, mlflow_cfg: Mapping | Any | None, run_name: str, params: dict):
        settings = _mlflow_settings(mlflow_cfg)
        self.enabled = bool(settings.get("enabled", False))
        self.run_id: str | None = None
        self._mlflow = None
        if not self.enabled:
            return
        require_mlflow()
        from ray.air.integrations.mlflow import setup_mlflow

        uri, experiment = settings.get("tracking_uri"), settings.get("experiment") or "raydistill"
        try:
            module = setup_mlflow(config=params, tracking_uri=uri, experiment_name=experiment, run_name=run_name,
                                  artifact_location=settings.get("artifact_location"),
                                  create_experiment_if_not_exists=True, rank_zero_only=True)
        except Exception as e:
            shown = uri or os.environ.get("MLFLOW_TRACKING_URI") or "mlflow's default (sqlite:///mlflow.db)"
            raise RuntimeError(f"MLflow run {run_name!r} in experiment {experiment!r} at tracking URI {shown}: "
                               f"could not start ({type(e).__name__}: {e})") from e
        if isinstance(module, types.ModuleType):  # the mlflow module: this is rank 0 (or no Ray Train)
            self._mlflow = module
            self.run_id = module.active_run().info.run_id

    @property
    def active(self) -> bool:
        """True in the one process that logs (enabled, rank 0, run not closed)."""
        return self._mlflow is not None

    def log_step(self, rec: dict) -> None:
        """Log one ``metrics.jsonl`` record at MLflow step ``rec["step"]``: every numeric field
        except ``step`` (null fields such as ``kd`` under ``sequence_kd`` are left out)."""
        if self._mlflow is None:
            return
        metrics = {k: float(v) for k, v in rec.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if metrics:
            self._mlflow.log_metrics(metrics, step=int(rec["step"]))

    def log_artifact(self, path: StoragePath | str | os.PathLike, artifact_path: str | None = None) -> None:
        """Copy a file or folder (local or ``s3://``) into the run's artifacts, under
        ``artifact_path`` if given. Raises ``FileNotFoundError`` if it does not exist."""
        if self._mlflow is None:
            return
        p = _as_storage(path)
        if not p.exists():
            raise FileNotFoundError(f"{p.uri}: no such file or folder to log to MLflow")
        if not p.remote:
            local = p.local()
            if local.is_dir():
                self._mlflow.log_artifacts(str(local), artifact_path=artifact_path or local.name)
            else:
                self._mlflow.log_artifact(str(local), artifact_path=artifact_path)
            return
        with tempfile.TemporaryDirectory(prefix="raydistill-mlflow-") as tmp:
            if p.is_file():
                target = Path(tmp) / p.name
                target.write_bytes(p.read_bytes())
                self._mlflow.log_artifact(str(target), artifact_path=artifact_path)
                return
            base = Path(tmp) / p.name
            for f in p.files():
                target = base / f.path[len(p.path.rstrip("/")) + 1:]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(f.read_bytes())
            self._mlflow.log_artifacts(str(base), artifact_path=artifact_path or p.name)

    def close(self, status: str = "FINISHED") -> None:
        """End the MLflow run with ``status`` (FINISHED, FAILED or KILLED); later calls do nothing."""
        if self._mlflow is None:
            return
        mlflow, self._mlflow = self._mlflow, None
        mlflow.end_run(status=status)

    def __enter__(self) -> "MlflowLogger":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("FAILED" if exc_type is not None else "FINISHED")
