"""Shared by the ``jobs/*.py`` entry points of ``ray job submit``.

Each entry point is ``raydistill <command>`` run in the job's driver process, with the same
arguments (``CONFIG [--set dotted.key=value ...] [--overwrite]``), so a job behaves exactly like
the command line: the same checks, messages and exit codes. In particular every command first
refuses an ``output_dir`` a job cannot use (a relative or unshared local path: under ``ray job
submit --working-dir .`` it would lie inside Ray's temporary copy of the working directory; see
``raydistill.jobmode``) and logs the absolute output location (``output location: s3://...``).

The driver imports only the CLI and the config model (no ray, torch, transformers or vllm at
import time): the stages import them when they start, and their work runs in Ray tasks and actors
that declare their resources.
"""

from __future__ import annotations

import sys
from pathlib import Path

#: The repository root (the job's working directory under ``ray job submit --working-dir .``).
REPO = Path(__file__).resolve().parents[1]


def run(command: str, argv: list[str] | None = None) -> None:
    """Run ``raydistill <command> *argv`` in this process and exit with its exit code (0 done,
    2 bad input, 130 interrupted: the CLI's codes).

    Args:
        command: a CLI command: ``run``, ``generate``, ``train``, ``evaluate``, ``serve``, ``bench-serve``.
        argv: its arguments; None = ``sys.argv[1:]``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    # Import raydistill from this checkout (what the job shipped) before any installed copy; Ray
    # puts the same working directory on every worker's path.
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import typer

    from raydistill.cli import app

    # The command itself (not the group), so that --help reads "python jobs/<script>.py CONFIG ...".
    typer.main.get_command(app).commands[command].main(argv, prog_name=f"python jobs/{Path(sys.argv[0]).name}")
