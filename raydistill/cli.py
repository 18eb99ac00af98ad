"""``raydistill`` command line: run | generate | train | evaluate | validate | demo | serve | bench-serve.

Every command takes a YAML config and repeatable ``--set dotted.key=value`` overrides, writes
the resolved config to ``<output_dir>/config.yaml``, and exits non-zero with a one-paragraph
message on bad input. Stage modules are imported lazily so ``--help`` and ``validate`` stay fast.
This module only wires the commands: ``validate``'s checks are ``raydistill.validate``, the Serve
lifecycle of ``serve`` is ``raydistill.serve.lifecycle``.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from .config import Config, ConfigError, demo_config_path, load

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distill LLMs on Ray: a teacher answers prompts, a student learns, a report compares.")

ConfigArg = Annotated[Path, typer.Argument(help="Run config (YAML).", show_default=False)]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override: dotted.key=value (repeatable).")]

log = logging.getLogger("raydistill")

#: exit code of `evaluate` and `run` when the student retains less than eval.min_retained (2: bad
#: input or a failed stage; 130: Ctrl-C)
GATE_FAILED = 3


def _version(value: bool) -> None:
    if value:
        from .runtime import provenance

        typer.echo(" ".join(f"{k} {v}" for k, v in provenance().items()))
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print raydistill's and its stack's versions.")] = False) -> None:
    """Distill LLMs on Ray: a teacher answers prompts, a student learns, a report compares."""


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code=2)


def _load(config: Path | None, overrides: list[str] | None) -> Config:
    try:
        return load(config, overrides or [])
    except ConfigError as e:
        _fail(str(e))
        raise  # unreachable


def _prepare(cfg: Config, stages: tuple[str, ...]) -> None:
    from .layout import output_location

    if "train" in stages and cfg.train.mlflow.enabled:  # before generation, not after it
        from .train.observe import MlflowMissingError, require_mlflow

        try:
            require_mlflow()
        except MlflowMissingError as e:
            _fail(str(e))
    (output_location(cfg) / "config.yaml").write_text(cfg.dump())


def _output_location(cfg: Config, reads_data: bool = False) -> str:
    """Refuse an output_dir (and, with ``reads_data``, a data.path) that a `ray job submit` driver
    cannot use (raydistill.jobmode), then say where the outputs go (absolute path or s3:// URI);
    returns it."""
    from .jobmode import JobModeError, check_output_dir, input_problem
    from .layout import output_location

    try:
        job = check_output_dir(cfg.output_dir, cfg.storage.shared_local)
    except JobModeError as e:
        _fail(str(e))
        raise  # unreachable
    problem = input_problem(cfg.data.path, cfg.storage.shared_local, job) if reads_data else None
    if problem:
        _fail(problem)
    uri = output_location(cfg).uri
    typer.echo(f"output location: {uri}" + (f" (Ray job {job})" if job else ""), err=True)
    return uri


def _unwritable(location: str, e: OSError) -> str:
    first = (str(e).strip().splitlines() or [repr(e)])[0]
    hint = ("check the bucket name, storage.endpoint_url (or AWS_ENDPOINT_URL) and the credentials"
            if location.startswith("s3://") else "check the path and its permissions")
    return f"cannot write to output_dir {location}: {first[:300]}; {hint}"


def _ensure_ray(cfg: Config, stages: tuple[str, ...]) -> None:
    """Start or join Ray and check that every stage fits it (raydistill.resources), before any runs."""
    import ray

    from .resources import ResourceError, ensure_ray

    ours = not ray.is_initialized()
    try:
        ensure_ray(cfg, stages)
    except ResourceError as e:
        if ours:
            ray.shutdown()
        _fail(str(e))


def _run_stages(cfg: Config, stages: tuple[str, ...], overwrite: bool = False) -> None:
    from .data import DataError
    from .models import ModelError
    from .schema import SchemaError

    _setup_logging()
    location = _output_location(cfg, reads_data="generate" in stages)
    try:
        _prepare(cfg, stages)
    except OSError as e:
        _fail(_unwritable(location, e))
    _ensure_ray(cfg, stages)
    t0 = time.perf_counter()
    stage = stages[0]
    report: dict = {}  # the evaluate stage's, for the quality gate
    try:
        for stage in stages:
            ts = time.perf_counter()
            log.info("=== stage %s ===", stage)
            if stage == "generate":
                from .generate import run_generate

                run_generate(cfg, overwrite=overwrite)
            elif stage == "train":
                from .train.stage import run_train

                run_train(cfg, overwrite=overwrite)
            else:
                from .evaluate import run_evaluate

                report = run_evaluate(cfg, overwrite=overwrite)
            log.info("=== stage %s done in %.0f s ===", stage, time.perf_counter() - ts)
    except (DataError, ModelError, SchemaError, OSError, ValueError) as e:  # OSError: unreachable storage, too
        _fail(str(e))
    except KeyboardInterrupt:
        after = {"generate": "rerun `raydistill generate` to continue where it stopped (answers already written "
                             "are kept; --overwrite starts again)",
                 "train": "`raydistill train` resumes from the latest checkpoint",
                 "evaluate": "rerun `raydistill evaluate`"}[stage]
        typer.echo(f"interrupted during stage {stage}: finished stages' outputs are kept; {after}", err=True)
        raise typer.Exit(code=130) from None
    log.info("finished in %.0f s; outputs in %s", time.perf_counter() - t0, location)
    if "evaluate" in stages:
        from .evaluate.report import gate_failure
        from .layout import eval_location

        typer.echo(f"report: {eval_location(cfg) / 'report.md'}")
        if failed := gate_failure(report):
            typer.echo(f"error: {failed}", err=True)
            raise typer.Exit(code=GATE_FAILED)


OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Make the stages' outputs again even when finished "
                                            "(by default a finished stage made from the same settings and inputs is "
                                            "skipped, one made with other settings is refused, an unfinished corpus "
                                            "is continued and an interrupted training resumes).")]


@app.command()
def run(config: ConfigArg, set_: SetOpt = None, overwrite: OverwriteOpt = False) -> None:
    """Run every stage: generate → train → evaluate."""
    _run_stages(_load(config, set_), ("generate", "train", "evaluate"), overwrite)


@app.command()
def generate(config: ConfigArg, set_: SetOpt = None, overwrite: OverwriteOpt = False) -> None:
    """Teacher answers the train/validation prompts → <output_dir>/corpus/ (a rerun continues where it stopped)."""
    _run_stages(_load(config, set_), ("generate",), overwrite)


@app.command()
def train(config: ConfigArg, set_: SetOpt = None, overwrite: OverwriteOpt = False) -> None:
    """Fine-tune the student on corpus/ → <output_dir>/student/ (skipped when finished with the same settings)."""
    _run_stages(_load(config, set_), ("train",), overwrite)


@app.command()
def evaluate(config: ConfigArg, set_: SetOpt = None, overwrite: OverwriteOpt = False) -> None:
    """Compare teacher, baseline and distilled student → <output_dir>/eval/ (skipped when finished with the same
    settings and models)."""
    _run_stages(_load(config, set_), ("evaluate",), overwrite)


@app.command()
def serve(config: ConfigArg, set_: SetOpt = None) -> None:
    """Serve teacher and student side by side (OpenAI API, A/B model `ab`) on Ray Serve until Ctrl-C.

    Deploys raydistill.serve.app on the local Ray (or RAY_ADDRESS) at http://serve.host:serve.port,
    writes the resolved config to <output_dir>/serve/config.yaml. Ctrl-C or SIGTERM shuts Serve
    down (on a RAY_ADDRESS cluster: deletes only this application), frees the port and exits 0."""
    import os

    from .jobmode import submission_id
    from .models import ModelError
    from .serve.app import serve_problems
    from .serve.lifecycle import serve_until_stopped

    cfg = _load(config, set_)
    # On a cluster (RAY_ADDRESS, or a Ray job) the replicas download hub ids and s3:// folders on
    # their own nodes: only local folders are checked here.
    problems = serve_problems(cfg, local_only=bool(os.environ.get("RAY_ADDRESS")) or submission_id() is not None)
    if problems:
        _fail("cannot serve:\n  " + "\n  ".join(problems))
    _setup_logging()
    location = _output_location(cfg)
    from .layout import serve_location

    try:
        (serve_location(cfg) / "config.yaml").write_text(cfg.dump())
    except OSError as e:
        _fail(_unwritable(location, e))
    _ensure_ray(cfg, ("serve",))
    try:
        started = serve_until_stopped(cfg, typer.echo)
    except ModelError as e:
        _fail(str(e))
        raise
    if not started:
        raise typer.Exit(code=130)


@app.command("bench-serve")
def bench_serve(config: ConfigArg, set_: SetOpt = None) -> None:
    """Load-test the running `raydistill serve` endpoint, teacher vs student → <output_dir>/bench/.

    Prints one JSON line last: overhead, the student/teacher latency and throughput ratios at the
    highest concurrency level, and the raw figures (see raydistill.serve.bench)."""
    cfg = _load(config, set_)
    _setup_logging()
    _output_location(cfg)
    from .schema import SchemaError
    from .serve.bench import run_bench, summary_line
    from .serve.client import EndpointError

    try:
        result = run_bench(cfg)
    except (EndpointError, SchemaError, OSError, ValueError) as e:  # OSError: FileNotFoundError (no corpus)
        _fail(str(e))
        raise
    typer.echo(f"report: {result['files']['markdown']}", err=True)
    typer.echo(summary_line(result))


@app.command()
def validate(config: ConfigArg, set_: SetOpt = None) -> None:
    """Check a config, its prompt file(s), model references and split sizes without running anything.

    One local file is checked whole (line-exact errors, duplicate ids, split sizes); a folder of
    shards, a glob or an s3:// path is checked on the first file's first rows (the same check
    generate runs before its job); split sizes are then not checked (they show the sample's)."""
    from .data import DataError
    from .validate import preflight, read_prompts_to_check, split_counts

    cfg = _load(config, set_)
    try:
        prompts, sampled = read_prompts_to_check(cfg)
    except (DataError, OSError) as e:
        _fail(str(e))
        raise
    counts = split_counts(prompts)
    problems = preflight(cfg, None if sampled else counts)  # a sample's split sizes say nothing of the whole
    if problems:
        _fail("the config would fail later:\n  " + "\n  ".join(problems))
    typer.echo(f"config OK: {prompts.num_rows} prompts ({', '.join(f'{k} {v}' for k, v in counts.items())}){sampled}; "
               f"teacher {cfg.teacher.model} ({cfg.teacher.engine}); output_dir {cfg.output_dir}")


@app.command()
def demo(set_: SetOpt = None, overwrite: OverwriteOpt = False) -> None:
    """`run` on the built-in demo config (embedded SmolLM2 teacher, pruned student)."""
    _run_stages(_load(demo_config_path(), set_), ("generate", "train", "evaluate"), overwrite)


def main() -> None:  # pragma: no cover
    app(prog_name="raydistill")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
