"""Running as a ``ray job submit`` driver: where a job's outputs may go, and saying where they went.

Under ``ray job submit --working-dir .`` Ray starts the entrypoint inside its own temporary copy of
the working directory (``<ray temp>/session_*/runtime_resources/working_dir_files/_ray_pkg_*``),
on the head node. A relative ``output_dir`` would resolve there: the outputs land in a folder Ray
deletes, while the log says ``runs/job``. Worker nodes do not see the driver's disk either. So a job
must name shared storage:

- ``s3://bucket/prefix`` (every node reaches it), or
- an absolute local path with ``storage.shared_local: true``: a filesystem every node mounts at the
  same path (NFS, EFS, a Lustre mount), or a one-machine cluster (a local ``ray start --head``).

A relative path is refused in job mode even with ``storage.shared_local``, since it would still
resolve inside Ray's temporary folder.

The same holds for a local command connected to a cluster (``RAY_ADDRESS``): once the cluster has
more than one node, or an autoscaler that may add some, training workers and engines run on other
machines and would write their shards to, or read the run's files from, their own disks. So the
one rule (``output_problem``) is applied twice: before anything starts (a job is known from its
environment) and once connected (``resources.ensure_ray``: the node count and the autoscaler are
known). A private local Ray (no ``RAY_ADDRESS``) is one machine: anything goes.

Light on purpose: imports nothing heavy (no ray), so the CLI checks before any stage starts.
"""

from __future__ import annotations

import json
import os

#: The variable Ray's job supervisor sets for the entrypoint process of a submitted job: JSON
#: ``{"runtime_env": {...}, "metadata": {"job_submission_id": ..., "job_name": ...}}``
#: (ray/dashboard/modules/job/job_supervisor.py, ``_get_driver_env_vars``).
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


class JobModeError(ValueError):
    """A config that cannot run as a Ray job as it is; the message names the field and the fix."""


def submission_id(environ: dict[str, str] | None = None) -> str | None:
    """The Ray job submission id (``raysubmit_...`` or the id given to ``ray job submit``) when
    this process is the entrypoint of a submitted job, else None.

    Read from ``RAY_JOB_CONFIG_JSON_ENV_VAR``; a job whose metadata lacks the id (it is always
    set by Ray 2.60) reads as ``"unknown"``, still truthy: job mode."""
    env = os.environ if environ is None else environ
    raw = env.get(JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        meta = json.loads(raw).get("metadata") or {}
    except (ValueError, AttributeError):
        return "unknown"
    return str(meta.get("job_submission_id") or "unknown")


def output_problem(output_dir: str, shared_local: bool, job: str | None, cwd: str | None = None,
                   nodes: int | None = None, may_add_nodes: bool = False) -> str | None:
    """Why ``output_dir`` cannot hold a run's outputs (None when it can).

    Args:
        output_dir: ``cfg.output_dir`` as written (``s3://...``, absolute or relative local path).
        shared_local: ``cfg.storage.shared_local``: the user says a local path is on storage
            every node mounts.
        job: the job submission id (``submission_id()``), or None outside a job.
        cwd: the driver's working directory (named in the message; default ``os.getcwd()``).
        nodes: live nodes of the connected cluster (None: not connected yet, or a private local
            Ray); outside a job, a local ``output_dir`` without ``shared_local`` is refused when
            ``nodes > 1`` or ``may_add_nodes`` (the cluster's autoscaler may add nodes).
    """
    if output_dir.startswith("s3://"):
        return None
    fix = ("name shared storage: --set output_dir=s3://BUCKET/PREFIX (or an absolute path on a filesystem "
           "every node mounts at the same path, with --set storage.shared_local=true)")
    expanded = os.path.expanduser(output_dir)
    if job is None:
        if shared_local or nodes is None or (nodes <= 1 and not may_add_nodes):
            return None
        size = f"{nodes} nodes" if nodes > 1 else "1 node and an autoscaler that may add more"
        return (f"output_dir {output_dir!r} is a local path, and the Ray cluster this run is connected to "
                f"(RAY_ADDRESS={os.environ.get('RAY_ADDRESS', '')!r}) has {size}: training workers and engines on "
                "other nodes would write their shards to, and read the run's files from, their own disks. "
                f"{fix[0].upper() + fix[1:]}")
    if not os.path.isabs(expanded):
        cwd = cwd or os.getcwd()
        return (f"output_dir {output_dir!r} is a relative path, and this is a Ray job ({job}): it would resolve "
                f"to {os.path.join(cwd, output_dir)}, inside Ray's temporary copy of the working directory, which "
                f"Ray deletes; worker nodes do not see it either. {fix[0].upper() + fix[1:]}")
    if not shared_local:
        return (f"output_dir {output_dir!r} is a local path, and this is a Ray job ({job}): the driver's disk is "
                "on the head node only; training workers and engines on other nodes would write to or read from "
                f"their own disks. {fix[0].upper() + fix[1:]}; on a one-machine cluster (a local `ray start "
                "--head`) storage.shared_local=true with an absolute path is fine")
    return None


def input_problem(data_path: str, shared_local: bool, job: str | None, cwd: str | None = None) -> str | None:
    """Why a job's Ray Data read tasks (which may run on any node) may not find ``data.path``
    (None when they will, or outside a job).

    Fine: ``s3://``, ``builtin:``, a path inside the job's working directory (Ray ships the working
    directory to every node, at the same path), or any local path with ``shared_local``. Refused: a
    local path elsewhere (absolute, or relative with ``..``), which only the head node has.
    """
    if job is None or shared_local or data_path.startswith(("s3://", "builtin:")):
        return None
    cwd = os.path.realpath(cwd or os.getcwd())
    expanded = os.path.join(cwd, os.path.expanduser(data_path))  # an absolute path stays as it is
    if os.path.commonpath([os.path.realpath(expanded), cwd]) == cwd:
        return None
    return (f"data.path {data_path!r} is a local path outside the job's working directory, and this is a Ray job "
            f"({job}): Ray Data reads it in tasks that may run on other nodes, which do not have it. Upload it "
            "(--set data.path=s3://BUCKET/PREFIX/prompts.jsonl), put it inside the folder given to --working-dir "
            "and name it by a relative path (Ray ships that folder to every node), or set "
            "storage.shared_local=true when every node mounts it at the same path")


def check_output_dir(output_dir: str, shared_local: bool, nodes: int | None = None,
                     may_add_nodes: bool = False) -> str | None:
    """Raise ``JobModeError`` when ``output_dir`` is not storage every node of the run reaches
    (``output_problem``: in a Ray job, or, with ``nodes``, on a connected cluster of several nodes);
    returns the job submission id (None outside a job)."""
    job = submission_id()
    problem = output_problem(output_dir, shared_local, job, nodes=nodes, may_add_nodes=may_add_nodes)
    if problem:
        raise JobModeError(problem)
    return job
