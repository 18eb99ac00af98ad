"""Training observability: the loss-curve PNG (local and s3://), metrics.jsonl read-back, and the
optional MLflow logger (a no-op when disabled; a clear install command when mlflow is missing; a
real sqlite tracking store when mlflow is installed)."""

import importlib.util
import io
import json
import math

import pytest

from raydistill.storage import storage_path
from raydistill.train.observe import MlflowLogger, MlflowMissingError, plot_losses, read_metrics, require_mlflow

from .conftest import make_bucket

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None


def _records(steps: int, kd: bool, val_every: int | None) -> list[dict]:
    recs = []
    for s in range(1, steps + 1):
        ce = 3.0 / s ** 0.3
        kd_part = 2.0 / s ** 0.5 if kd else None
        rec = {"step": s, "epoch": (s - 1) // 10, "loss": 0.5 * ce + 0.5 * kd_part if kd else ce, "ce": ce,
               "kd": kd_part, "lr": 1e-4, "grad_norm": 1.5, "tokens": 1024, "tokens_per_s": 512.0, "seconds": 2.0}
        if val_every and s % val_every == 0:
            rec["val_loss"] = ce + 0.2
        recs.append(rec)
    return recs


def _check_png(data: bytes) -> tuple[int, int]:
    """Valid PNG bytes that matplotlib reads back; returns (height, width) in pixels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg

    assert len(data) > 1000 and data[:8] == PNG_MAGIC
    img = mpimg.imread(io.BytesIO(data), format="png")
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    assert img[..., :3].std() > 0.01  # something is drawn, not a blank canvas
    return img.shape[0], img.shape[1]


@pytest.mark.parametrize("kd,val_every", [(True, 5), (False, 5), (False, None), (True, None)],
                         ids=["kd+val", "ce+val", "ce", "kd"])
def test_plot_losses_writes_png(tmp_path, kd, val_every):
    out = tmp_path / "train" / "loss.png"  # parent folder does not exist yet
    plot_losses(_records(25, kd, val_every), out, "student: logit_kd")
    assert _check_png(out.read_bytes()) == (420, 700)  # figsize (7, 4.2) at 100 dpi
    assert [p.name for p in tmp_path.joinpath("train").iterdir()] == ["loss.png"]  # no temporary file left


def test_plot_losses_kd_parts_drawn_only_when_present(tmp_path, monkeypatch):
    """The legend names exactly the curves that have data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.figure

    labels = {}

    def spy(self, *args, **kwargs):
        labels["last"] = [t.get_text() for ax in self.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
        return real(self, *args, **kwargs)

    real = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    plot_losses(_records(12, kd=True, val_every=4), tmp_path / "a.png", "t")
    assert labels["last"] == ["train loss", "train ce (cross-entropy part)", "train kd (divergence part)",
                              "validation loss"]
    plot_losses(_records(12, kd=False, val_every=None), tmp_path / "b.png", "t")
    assert labels["last"] == ["train loss"]


def test_plot_losses_edge_cases(tmp_path):
    # one step; a NaN loss; a step repeated by a resumed run (the later record wins)
    plot_losses([{"step": 1, "loss": 2.0}], tmp_path / "one.png", "one step")
    _check_png((tmp_path / "one.png").read_bytes())
    recs = _records(6, kd=False, val_every=3)
    recs[2]["loss"] = math.nan
    recs.append(dict(recs[3], loss=9.0))  # step 4 again
    plot_losses(recs, tmp_path / "odd.png", "resumed")
    _check_png((tmp_path / "odd.png").read_bytes())
    with pytest.raises(ValueError, match="no metrics records"):
        plot_losses([], tmp_path / "none.png", "empty")
    with pytest.raises(ValueError, match=r"metrics record 1: missing field\(s\) \['loss'\]"):
        plot_losses([{"step": 1, "loss": 1.0}, {"step": 2}], tmp_path / "bad.png", "bad")


def test_plot_losses_to_s3(s3_server):
    out = storage_path(make_bucket("observe-test") + "/run1/train/loss.png")
    plot_losses(_records(20, kd=True, val_every=5), out, "s3 run")
    assert out.is_file()
    _check_png(out.read_bytes())
    # a plain "s3://" string works too
    plot_losses(_records(3, kd=False, val_every=None), "s3://observe-test/run1/train/loss2.png", "s3 str")
    _check_png(storage_path("s3://observe-test/run1/train/loss2.png").read_bytes())


def test_read_metrics(tmp_path):
    recs = _records(4, kd=True, val_every=2)
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + "\n")
    assert read_metrics(path) == recs
    path.write_text(json.dumps(recs[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not JSON"):
        read_metrics(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="line 1: expected a JSON object, got list"):
        read_metrics(path)
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        read_metrics(tmp_path / "absent.jsonl")


@pytest.mark.skipif(HAS_MLFLOW, reason="mlflow is installed here")
def test_require_mlflow_names_install_command():
    with pytest.raises(ImportError, match=r"`pip install mlflow`") as info:
        require_mlflow()
    assert isinstance(info.value, MlflowMissingError)
    # enabling MLflow without the package fails the same way, before anything else happens
    with pytest.raises(MlflowMissingError, match="train.mlflow.enabled"):
        MlflowLogger({"enabled": True}, "run", {})


def test_mlflow_logger_disabled_is_noop(tmp_path):
    from raydistill.config import MlflowConfig

    for cfg in ({"enabled": False, "tracking_uri": "sqlite:///never.db"}, MlflowConfig(), None, {}):
        with MlflowLogger(cfg, "run", {"a": 1}) as logger:
            assert not logger.enabled and not logger.active and logger.run_id is None
            logger.log_step({"step": 1, "loss": 1.0})
            logger.log_artifact(tmp_path / "absent.png")  # not even checked when disabled
        logger.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not HAS_MLFLOW, reason="needs `pip install mlflow` (optional)")
def test_mlflow_logger_sqlite_store(tmp_path, monkeypatch):
    """A real local tracking store: params, per-step metrics and an artifact read back."""
    import mlflow

    monkeypatch.chdir(tmp_path)  # anything mlflow writes relative to the working directory stays here
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    recs = _records(5, kd=False, val_every=5)
    png = tmp_path / "loss.png"
    with MlflowLogger({"enabled": True, "tracking_uri": uri, "experiment": "observe-test",
                       "artifact_location": str(tmp_path / "artifacts")}, "student-1",
                      {"train": {"loss": "sequence_kd", "lr": 1e-4}, "seed": 0}) as logger:
        assert logger.active and logger.run_id
        for rec in recs:
            logger.log_step(rec)
        plot_losses(recs, png, "mlflow")
        logger.log_artifact(png, artifact_path="train")
    client = mlflow.tracking.MlflowClient(uri)
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "student-1"
    assert run.data.params == {"train/loss": "sequence_kd", "train/lr": "0.0001", "seed": "0"}
    assert [(m.step, m.value) for m in client.get_metric_history(logger.run_id, "loss")] == \
        [(r["step"], pytest.approx(r["loss"])) for r in recs]
    assert "kd" not in run.data.metrics  # null under sequence_kd
    assert [(m.step, m.value) for m in client.get_metric_history(logger.run_id, "val_loss")] == \
        [(5, pytest.approx(recs[4]["val_loss"]))]
    assert [a.path for a in client.list_artifacts(logger.run_id, "train")] == ["train/loss.png"]
    assert [p.name for p in (tmp_path / "artifacts").rglob("*.png")] == ["loss.png"]  # artifact_location honoured
