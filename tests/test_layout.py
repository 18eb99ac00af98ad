"""The run folder's locations (raydistill.layout), local and ``s3://``, and that no other module of
``raydistill/`` spells a run folder's name. Unit tests: no Ray, no network (an ``s3://``
``StoragePath`` with a region set is built without asking S3 anything)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from raydistill import layout
from raydistill.config import load

PACKAGE = Path(__file__).resolve().parents[1] / "raydistill"

#: location function → its folder under output_dir
FOLDERS = {
    layout.output_location: "",
    layout.corpus_location: "corpus",
    layout.baseline_location: "baseline_student",
    layout.train_location: "train",
    layout.examples_location: "train/examples",
    layout.ray_train_location: "train/ray",
    layout.student_location: "student",
    layout.eval_location: "eval",
    layout.eval_partial_location: "eval.partial",
    layout.serve_location: "serve",
    layout.bench_location: "bench",
}

NAMES = "corpus|baseline_student|train|examples|ray|student|eval|serve|bench"
#: a run folder's name as a path segment: ``x / "student"``, ``"/student"`` (``+ "/student"``,
#: ``"/student/..."``), and ``"eval.partial"`` anywhere (``with_name("eval.partial")``)
RUN_FOLDER_LITERAL = re.compile(rf"""/\s*["']({NAMES})["']|["']/({NAMES})["'/]|["']eval\.partial""")
#: a line that names such a folder for something else (a scratch folder) says so
NOT_A_RUN_FOLDER = "# not a run folder"


def _with(*sets: str):
    return load(None, list(sets))


@pytest.mark.parametrize("prune", [True, False])
def test_local_locations(tmp_path, prune):
    cfg = _with(f"output_dir={tmp_path / 'run'}", *(() if prune else ("student.init=pretrained",
                                                                       "student.model=some/student")))
    for location, folder in FOLDERS.items():
        got = location(cfg)
        want = tmp_path / "run" / folder if folder else tmp_path / "run"
        assert not got.remote and got.uri == str(want) and got.local() == want, location.__name__
    assert layout.examples_location(cfg, "validation").local() == tmp_path / "run" / "train" / "examples" / "validation"
    assert layout.baseline_student_ref(cfg) == (str(tmp_path / "run" / "baseline_student") if prune else "some/student")


def test_a_relative_output_dir_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _with("output_dir=runs/x")
    assert layout.student_location(cfg).local() == tmp_path / "runs" / "x" / "student"
    assert layout.eval_partial_location(cfg).uri == str(tmp_path / "runs" / "x" / "eval.partial")


@pytest.mark.parametrize("output_dir", ["s3://bucket/run", "s3://bucket/run/"])
def test_s3_locations(output_dir):
    cfg = _with(f"output_dir={output_dir}", "storage.region=eu-west-1")
    for location, folder in FOLDERS.items():
        got = location(cfg)
        assert got.remote and got.uri == "s3://bucket/run" + (f"/{folder}" if folder else ""), location.__name__
        assert got.path == got.uri[len("s3://"):]
        with pytest.raises(ValueError):
            got.local()
    assert layout.examples_location(cfg, "train").uri == "s3://bucket/run/train/examples/train"
    assert layout.baseline_student_ref(cfg) == "s3://bucket/run/baseline_student"


def run_folder_literals(package: Path) -> list[str]:
    """``file:line: text`` of every run folder name spelled outside ``layout.py``."""
    found = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "layout.py" and path.parent == package:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if RUN_FOLDER_LITERAL.search(line) and NOT_A_RUN_FOLDER not in line:
                found.append(f"{path.relative_to(package.parent)}:{n}: {line.strip()}")
    return found


def test_the_check_sees_hand_built_run_folders():
    """What the stages wrote before layout.py named every folder is caught; dict keys, model
    names and split names are not."""
    for line in ('out / "baseline_student"', "storage_path(cfg.output_dir, cfg.storage) / 'eval' / 'report.md'",
                 'tmp = folder.with_name("eval.partial")', 'return cfg.output_dir.rstrip("/") + "/student"',
                 'train_dir / "examples" / split', 'ray_dir = train_dir / "ray"', 'x /"bench"'):
        assert RUN_FOLDER_LITERAL.search(line), line
    for line in ('{"student": out, "eval": 1}', 'ARMS = ("teacher", "student")', 'split == "train"',
                 'run_requests(base_url, "student", prompts)', 'datasets={"train": ds}', "f'{run}/student'"):
        assert not RUN_FOLDER_LITERAL.search(line), line


def test_no_module_but_layout_spells_a_run_folder():
    found = run_folder_literals(PACKAGE)
    assert not found, ("a run folder's path built by hand (use raydistill.layout's *_location functions; "
                       f"mark a scratch folder with '{NOT_A_RUN_FOLDER}'):\n" + "\n".join(found))
