"""Resource precheck: does a stage fit the Ray cluster (as it is, or as its autoscaler can grow it)?

A stage that asks for more than the cluster can ever give does not fail in Ray: its actors stay
pending ("pending: 1.25 CPU") and the job hangs. ``precheck`` compares, before anything launches,
what each stage asks for (``stage_asks``: the actors, placement-group bundles and Ray Data tasks it
starts, read from the config the way the stage builds them) with the cluster (``cluster_capacity``:
the live nodes plus the nodes the autoscaler may add) and raises ``ResourceError`` with both
numbers when it cannot fit.

What a stage asks for (per unit; every unit must fit on one node, all units at once):

- generate (``teacher.*``): ``replicas`` engine replicas, all at once (a fixed pool) — vLLM on CPU: ``cpus_per_replica`` CPU;
  vLLM on GPUs: ``tensor_parallel_size × pipeline_parallel_size`` bundles of 1 GPU + 1 CPU (Ray
  Data's vLLM stage); hf: ``cpus_per_replica`` CPU + ``gpus_per_replica`` GPU; openai:
  ``cpus_per_replica`` CPU per HTTP actor — plus, for vLLM, the 0.25-CPU prompt tokenizer actor,
  plus 1 CPU for Ray Data's read/map/write tasks.
- train (``train.*``): ``workers`` × (``cpus_per_worker`` CPU + 1 GPU with ``use_gpu``, of
  ``accelerator_type`` when set) + 1 CPU
  for Ray Data (the examples are streamed to the workers by Ray Data tasks).
- evaluate: the teacher's engine (``teacher.*`` resources on ``eval.engine``), then the students'
  (``eval.*``), one after the other: each must fit on its own.
- serve: both arms at once (``serve.teacher`` and ``serve.student``: replicas × the bundles of
  ``serve.app``'s placement groups, the first with 1 more CPU for Ray Serve LLM's replica actor);
  Serve's controller and proxy take 0 CPU, and so does raydistill's ingress (serve/app.py).

What the cluster can give: the live nodes (``ray.nodes()``), plus, when an autoscaler's limits are
known, the nodes it may still add — from the cluster config stored in the GCS (what Ray Train and
Ray Data read: ``ray._private.state.state.get_cluster_config()``, node groups with their resources
and max counts), else from the cluster-launcher YAML the head was started with
(``$RAYDISTILL_AUTOSCALER_CONFIG``, default ``~/ray_bootstrap_config.yaml``, which ``ray up``
writes on the head node, where job drivers run). When a non-readonly autoscaler is running but its
limits are unknown, the check only warns. Bundles are packed first-fit-decreasing onto the live
nodes (a ``STRICT_PACK`` unit, serve's tensor-parallel teacher, all on one node), then onto new
nodes of the smallest type that holds them (the autoscaler's utilization score prefers those).

A private local Ray (no ``RAY_ADDRESS``) is started by raydistill: ``ensure_ray`` sizes its
logical CPUs to the largest stage when ``max(8, cores)`` (``runtime.init_ray``'s default) is too
few, so a stage such as ``train.workers`` ≥ logical CPUs no longer deadlocks Ray Data; GPUs it
cannot add, so a GPU ask on a machine without them fails with both numbers.
``RAYDISTILL_SKIP_RESOURCE_CHECK=1`` skips the check (a cluster whose limits the check misreads).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .config import Config, EngineConfig

log = logging.getLogger(__name__)

AUTOSCALER_CONFIG_ENV = "RAYDISTILL_AUTOSCALER_CONFIG"
SKIP_ENV = "RAYDISTILL_SKIP_RESOURCE_CHECK"
#: Where `ray up` writes the cluster config on the head node.
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
#: CPU reserved for Ray Data's tasks (read, map, write) beside a stage's actors: a map task takes 1 CPU.
DATA_TASK_CPU = 1.0
#: ray.data.llm's vLLM path in raydistill: the prompt tokenizer actor (generate/vllm_engine.py).
TOKENIZER_CPU = 0.25
_EPS = 1e-9


class ResourceError(RuntimeError):
    """A stage cannot fit the cluster; the message gives what it needs and what the cluster has."""


Resources = dict[str, float]


@dataclass(frozen=True)
class Demand:
    """``count`` units of one kind, each made of ``bundles`` (each bundle must fit on one node)."""

    what: str                     # "engine replica"
    count: int
    bundles: tuple[Resources, ...]
    knob: str = ""                # the config fields that set it ("train.workers or train.cpus_per_worker")
    one_node: bool = False        # a unit's bundles must share one node (a STRICT_PACK placement group)
    accel_knob: str = ""          # the config field of its accelerator type ("teacher.accelerator_type")

    def per_unit(self) -> Resources:
        return _add(*self.bundles)

    def total(self) -> Resources:
        return {k: v * self.count for k, v in self.per_unit().items()}

    def describe(self) -> str:
        if self.what == DATA_TASKS:
            return f"{_fmt(self.total())} for {DATA_TASKS}"
        unit = _fmt(self.per_unit())
        noun = self.what if self.count == 1 else _plural(self.what)
        if len(self.bundles) > 1:
            shapes = [(b, sum(1 for x in self.bundles if _key(x) == b)) for b in dict.fromkeys(map(_key, self.bundles))]
            unit += " in " + " + ".join(f"{n} bundle{'s' if n > 1 else ''} of {_fmt(dict(b))}" for b, n in shapes)
            if self.one_node:
                unit += " on one node"
        return f"{self.count} {noun} × {unit}"


@dataclass(frozen=True)
class StageAsk:
    """What one stage (or one step of it: evaluate's teacher, its students) asks for at once."""

    stage: str
    demands: tuple[Demand, ...]

    def total(self) -> Resources:
        return _add(*(d.total() for d in self.demands))

    def items(self) -> list[tuple[Demand, Resources]]:
        """Every bundle to place, with its demand."""
        return [(d, b) for d in self.demands for _ in range(d.count) for b in d.bundles]

    def describe(self) -> str:
        parts = " + ".join(d.describe() for d in self.demands)
        total = {k: v for k, v in self.total().items() if not k.startswith("accelerator_type:")}
        return f"{self.stage} needs {parts} = {_fmt(total)}"


@dataclass(frozen=True)
class NodeType:
    """A node type the autoscaler may add: ``resources`` per node, up to ``max_new`` more nodes (None = no limit)."""

    name: str
    resources: Resources
    max_new: int | None


@dataclass
class Capacity:
    """The cluster: live nodes' total resources and what the autoscaler may add.

    ``limits``: where the autoscaler's limits came from ("" = no autoscaler: a fixed cluster);
    ``unknown_autoscaler``: an autoscaler runs but its limits are unknown (the check only warns);
    ``local``: a private local Ray raydistill started; ``max_new_nodes``: the autoscaler's
    cluster-wide cap on added workers (None = none)."""

    nodes: list[Resources]
    node_types: list[NodeType] = field(default_factory=list)
    limits: str = ""
    unknown_autoscaler: bool = False
    local: bool = False
    max_new_nodes: int | None = None

    def current(self) -> Resources:
        return _add(*self.nodes)

    def maximum(self) -> Resources:
        """Current plus every node the autoscaler may add (``inf`` where unlimited)."""
        out = dict(self.current())
        for t in self.node_types:
            n = t.max_new if t.max_new is not None else self.max_new_nodes
            for k, v in t.resources.items():
                out[k] = out.get(k, 0.0) + (math.inf if n is None else v * n)
        return out

    def describe(self, keys: list[str]) -> str:
        have = _fmt(self.current(), keys)
        n = len(self.nodes)
        where = "this machine's private local Ray has" if self.local else "the cluster has"
        text = f"{where} {have} ({n} node{'s' if n != 1 else ''})"
        if self.local:
            return text
        if not self.node_types:
            return text + (" and its autoscaler's limits are unknown" if self.unknown_autoscaler
                           else " and cannot scale (no autoscaler)" if not self.limits
                           else f" and cannot scale ({self.limits} adds no such nodes)")
        types = ", ".join(f"{t.name}: {_fmt(t.resources)} × up to "
                          f"{'any number of' if t.max_new is None else t.max_new} more" for t in self.node_types)
        return text + f" and can scale to {_fmt(self.maximum(), keys)} ({types}; limits from {self.limits})"


# ----------------------------------------------------------------------------- what stages ask for

def _engine_demands(engine: EngineConfig, knob: str, gpu: bool) -> list[Demand]:
    """The replicas of one generation engine, as answer.answer_dataset starts them."""
    kind = engine.engine
    accel = engine.accelerator_type
    if kind == "vllm":
        if gpu:
            workers = engine.tensor_parallel_size * engine.pipeline_parallel_size
            bundle: Resources = {"CPU": 1.0, "GPU": 1.0}
            if accel:
                bundle[f"accelerator_type:{accel}"] = 0.001
            replica = Demand("engine replica", engine.replicas, (bundle,) * workers,
                             f"{knob}.replicas or {knob}.tensor_parallel_size", accel_knob=f"{knob}.accelerator_type")
        else:
            replica = Demand("engine replica", engine.replicas, ({"CPU": engine.cpus_per_replica},),
                             f"{knob}.replicas or {knob}.cpus_per_replica")
        return [replica, Demand("prompt tokenizer", 1, ({"CPU": TOKENIZER_CPU},))]
    bundle = {"CPU": engine.cpus_per_replica}
    if kind == "hf" and engine.gpus_per_replica > 0:
        bundle["GPU"] = engine.gpus_per_replica
    what = "HTTP request actor" if kind == "openai" else "engine replica"
    per = f"{knob}.gpus_per_replica" if "GPU" in bundle else f"{knob}.cpus_per_replica"
    return [Demand(what, engine.replicas, (bundle,), f"{knob}.replicas or {per}")]


DATA_TASKS = "Ray Data tasks"


def _data_tasks() -> Demand:
    return Demand(DATA_TASKS, 1, ({"CPU": DATA_TASK_CPU},))


def _vllm_on_gpu(engine: EngineConfig, cluster_gpus: float) -> bool:
    # The rule of generate/answer.py: GPU settings (EngineConfig.asks_gpu), or the connected cluster has GPUs.
    return engine.asks_gpu() or cluster_gpus > 0


def stage_asks(cfg: Config, stage: str, cluster_gpus: float = 0.0) -> list[StageAsk]:
    """What ``stage`` (generate, train, evaluate, serve) asks for; several asks = steps run one
    after the other (each must fit on its own). ``cluster_gpus``: GPUs the cluster has now
    (vLLM runs on GPUs when it has any, as generate/answer.py decides)."""
    if stage == "generate":
        t = cfg.teacher
        return [StageAsk("generate", (*_engine_demands(t, "teacher", _vllm_on_gpu(t, cluster_gpus)),
                                      _data_tasks()))]
    if stage == "train":
        tr = cfg.train
        worker: Resources = {"CPU": tr.cpus_per_worker}
        if tr.use_gpu:
            worker["GPU"] = 1.0
        if tr.accelerator_type:  # as Ray Train's ScalingConfig adds it (train/stage.scaling_config)
            worker[f"accelerator_type:{tr.accelerator_type}"] = 0.001
        return [StageAsk("train", (Demand("training worker", tr.workers, (worker,), "train.workers or train.cpus_per_worker",
                                          accel_knob="train.accelerator_type"), _data_tasks()))]
    if stage == "evaluate":
        api = cfg.teacher.engine == "openai"
        teacher = cfg.teacher.model_copy(update={"engine": "openai" if api else cfg.eval.engine})
        return [StageAsk("evaluate (teacher)", (*_engine_demands(teacher, "teacher",
                                                                 _vllm_on_gpu(teacher, cluster_gpus)), _data_tasks())),
                StageAsk("evaluate (students)", (*_engine_demands(cfg.eval, "eval",
                                                                  _vllm_on_gpu(cfg.eval, cluster_gpus)),
                                                 _data_tasks()))]
    if stage == "serve":
        demands = []
        for name in ("teacher", "student"):
            arm = getattr(cfg.serve, name)
            demands.append(Demand(f"{name} replica", arm.replicas, _serve_bundles(arm),
                                  f"serve.{name}.replicas or serve.{name}.cpus_per_replica",
                                  one_node=arm.gpus_per_replica > 0 and arm.tensor_parallel_size > 1,  # STRICT_PACK
                                  accel_knob=f"serve.{name}.accelerator_type"))
        return [StageAsk("serve", tuple(demands))]
    raise ValueError(f"unknown stage {stage!r}")


#: Ray Serve LLM's replica actor (default ``num_cpus`` 1), merged into a replica's first bundle
#: (ray/llm/_internal/serve/core/server/llm_server.py, ``_merge_replica_actor_and_child_actor_bundles``).
SERVE_REPLICA_CPU = 1.0


def _serve_bundles(arm) -> tuple[Resources, ...]:
    """One replica's placement-group bundles, as serve/app.py builds them, with the replica
    actor's CPU in the first."""
    accel = {f"accelerator_type:{arm.accelerator_type}": 0.001} if arm.accelerator_type else {}
    first = arm.cpus_per_replica + SERVE_REPLICA_CPU
    if arm.gpus_per_replica <= 0:
        return ({"CPU": first},)
    if arm.tensor_parallel_size == 1:
        return ({"GPU": min(arm.gpus_per_replica, 1.0), "CPU": first, **accel},)
    return ({"GPU": 1.0, "CPU": first, **accel},) + ({"GPU": 1.0, **accel},) * (arm.tensor_parallel_size - 1)


# ----------------------------------------------------------------------------- fitting

def _fits(bundle: Resources, free: Resources, lenient_accel: bool = False) -> bool:
    for k, v in bundle.items():
        if k.startswith("accelerator_type:") and lenient_accel and not any(r.startswith("accelerator_type:") for r in free):
            continue  # a node type whose accelerator the config does not state: assume it may match
        if free.get(k, 0.0) + _EPS < v:
            return False
    return True


def _key(bundle: Resources) -> tuple:
    return tuple(sorted(bundle.items()))


def _take(free: Resources, bundle: Resources) -> None:
    for k, v in bundle.items():
        if k in free:
            free[k] -= v


def _units(ask: StageAsk) -> list[tuple[Demand, list[Resources]]]:
    """What must be placed together: a ``one_node`` unit's bundles as one piece, else each bundle."""
    units = []
    for d in ask.demands:
        for _ in range(d.count):
            if d.one_node:
                units.append((d, [_add(*d.bundles)]))
            else:
                units.extend((d, [b]) for b in d.bundles)
    return units


def place(ask: StageAsk, capacity: Capacity) -> tuple[list[tuple[Demand, Resources]], dict[str, int]]:
    """Pack ``ask``'s bundles first-fit-decreasing onto the live nodes, then onto nodes the
    autoscaler may add (the smallest node type that holds the piece, as the autoscaler's
    utilization score prefers); the bundles of a ``one_node`` unit go to one node together.
    Returns (the pieces that fit nowhere, added nodes per node type)."""
    free = [dict(n) for n in capacity.nodes]
    lenient = [False] * len(free)
    added: dict[str, int] = {}
    left = {t.name: t.max_new for t in capacity.node_types}
    total_left = capacity.max_new_nodes
    unplaced = []
    size = lambda r: (r.get("GPU", 0.0), r.get("CPU", 0.0))  # noqa: E731
    order = sorted(_units(ask), key=lambda it: tuple(-x for x in size(it[1][0])))
    types = sorted(capacity.node_types, key=lambda t: size(t.resources))
    for demand, (piece,) in order:
        slot = next((i for i, f in enumerate(free) if _fits(piece, f, lenient[i])), None)
        if slot is None and (total_left is None or total_left > 0):
            for t in types:
                if (left[t.name] is None or left[t.name] > 0) and _fits(piece, t.resources, True):
                    free.append(dict(t.resources))
                    lenient.append(True)
                    slot = len(free) - 1
                    added[t.name] = added.get(t.name, 0) + 1
                    if left[t.name] is not None:
                        left[t.name] -= 1
                    if total_left is not None:
                        total_left -= 1
                    break
        if slot is None:
            unplaced.append((demand, piece))
        else:
            _take(free[slot], piece)
    return unplaced, added


def fit_problem(ask: StageAsk, capacity: Capacity) -> str | None:
    """Why ``ask`` cannot fit ``capacity`` (None when it fits): what the stage needs, what the
    cluster has and can scale to, and which config fields to lower."""
    unplaced, _ = place(ask, capacity)
    if not unplaced:
        return None
    keys = [k for k in ask.total() if not k.startswith("accelerator_type:")]
    text = f"{ask.describe()}, but {capacity.describe(keys)}"
    all_nodes = capacity.nodes + [t.resources for t in capacity.node_types]
    demand, bundle = unplaced[0]
    if not any(_fits(bundle, n, True) for n in all_nodes):
        biggest = max(all_nodes, key=lambda n: (n.get("GPU", 0.0), n.get("CPU", 0.0)), default={})
        shown = [k for k in bundle if not k.startswith("accelerator_type:")]
        shown += [k for k in biggest if k.startswith("accelerator_type:")]
        text += (f"; one {demand.what} needs {_fmt(bundle)} on one node, and no node "
                 f"{'has or can have' if capacity.node_types else 'has'} that (the largest: "
                 f"{_fmt(biggest, shown) or 'nothing'})")
    accel = [k.split(":", 1)[1] for k in bundle if k.startswith("accelerator_type:")]
    plain = {k: v for k, v in bundle.items() if not k.startswith("accelerator_type:")}
    if (accel and demand.accel_knob and not any(_fits(bundle, n, True) for n in all_nodes)
            and any(_fits(plain, n) for n in all_nodes)):
        present = sorted({k.split(":", 1)[1] for n in all_nodes for k in n if k.startswith("accelerator_type:")})
        return (f"{text}. No node is or can be of accelerator type {accel[0]} (the cluster's: "
                f"{', '.join(present) or 'none labelled'}): set {demand.accel_knob} to one of them, or give the "
                f"cluster {accel[0]} nodes")
    knobs = [d.knob for d in ask.demands if d.knob]
    hint = f"lower {' or '.join(knobs)}" if knobs else "lower the resources per unit"
    if capacity.local:
        return f"{text}. {hint[0].upper() + hint[1:]}, or set RAY_ADDRESS to a cluster that has them"
    return f"{text}. {hint[0].upper() + hint[1:]}, or give the cluster more nodes (or a higher max_workers)"


# ----------------------------------------------------------------------------- the cluster

_SKIP_KEYS = ("memory", "object_store_memory")


def _node_resources(raw: dict) -> Resources:
    return {k: float(v) for k, v in raw.items()
            if k not in _SKIP_KEYS and not k.startswith("node:")}


def node_types_from_launcher(config: dict, live_types: dict[str, int] | None = None) -> tuple[list[NodeType], int | None]:
    """Worker node types of a cluster-launcher / autoscaler config (``available_node_types``:
    ``resources``, ``max_workers``; the head type is left out), minus the live nodes of each type
    (``live_types``: type name → count, when known). Returns (types, the config's cluster-wide
    ``max_workers`` minus the live workers, or None)."""
    live_types = live_types or {}
    head = config.get("head_node_type")
    types = []
    for name, spec in (config.get("available_node_types") or {}).items():
        if name == head:
            continue
        res = _node_resources(spec.get("resources") or {})
        max_workers = spec.get("max_workers", config.get("max_workers"))
        if not res or max_workers == 0:
            continue
        max_new = None if max_workers is None else max(0, int(max_workers) - live_types.get(name, 0))
        types.append(NodeType(name, res, max_new))
    cap = config.get("max_workers")
    live_workers = sum(n for name, n in live_types.items() if name != head)
    return types, (None if cap is None else max(0, int(cap) - live_workers))


def node_types_from_gcs(cluster_config, live_types: dict[str, int] | None = None) -> list[NodeType]:
    """Node groups of the GCS-stored ``autoscaler_pb2.ClusterConfig`` (max_count -1 = unlimited)."""
    live_types = live_types or {}
    types = []
    for g in cluster_config.node_group_configs:
        res = _node_resources(dict(g.resources))
        if not res or g.max_count == 0:
            continue
        max_new = None if g.max_count < 0 else max(0, g.max_count - live_types.get(g.name, 0))
        types.append(NodeType(g.name, res, max_new))
    return types


def _live_nodes() -> tuple[list[Resources], dict[str, int]]:
    import ray

    nodes, types = [], {}
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        nodes.append(_node_resources(n.get("Resources") or {}))
        labels = n.get("Labels") or {}
        kind = labels.get("ray.io/node-group") or labels.get("ray.io/node-type-name")
        if kind:
            types[kind] = types.get(kind, 0) + 1
    return nodes, types


def _autoscaler_running_non_readonly() -> bool:
    """True when the autoscaler's status (GCS key ``__autoscaling_status``) names node types that
    are not the readonly provider's per-node mirrors (``node_<id>``): a real autoscaler."""
    import json

    try:
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get("__autoscaling_status")
    except Exception:  # noqa: BLE001 - no status is "not known to autoscale"
        return False
    if not raw:
        return False
    try:
        report = json.loads(raw).get("autoscaler_report") or {}
    except ValueError:
        return False
    names = set((report.get("active_nodes") or {})) | set((report.get("idle_nodes") or {}))
    names |= set((report.get("pending_launches") or {}))
    return any(not n.startswith("node_") for n in names)


def cluster_capacity(local: bool = False) -> Capacity:
    """The connected cluster (``ray.init`` done): live nodes and the autoscaler's limits.

    ``local``: this is a private local Ray raydistill started (no autoscaler, and its size is
    raydistill's own choice)."""
    nodes, live_types = _live_nodes()
    if local:
        return Capacity(nodes, local=True)
    try:
        import ray._private.state

        gcs = ray._private.state.state.get_cluster_config()
    except Exception:  # noqa: BLE001 - an older or stripped Ray: fall back to the launcher file
        gcs = None
    if gcs is not None and gcs.node_group_configs:
        return Capacity(nodes, node_types_from_gcs(gcs, live_types), limits="the GCS cluster config")
    path = Path(os.path.expanduser(os.environ.get(AUTOSCALER_CONFIG_ENV) or BOOTSTRAP_CONFIG))
    if path.is_file():
        import yaml

        try:
            config = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            log.warning("resource check: cannot read the autoscaler config %s (%s); checking the live nodes only",
                        path, e)
            config = {}
        if config.get("available_node_types"):
            types, cap = node_types_from_launcher(config, live_types)
            return Capacity(nodes, types, limits=str(path), max_new_nodes=cap)
    return Capacity(nodes, unknown_autoscaler=_autoscaler_running_non_readonly())


# ----------------------------------------------------------------------------- the check

def _asks(cfg: Config, stages: tuple[str, ...], cluster_gpus: float) -> list[StageAsk]:
    return [a for s in stages for a in stage_asks(cfg, s, cluster_gpus)]


def check(cfg: Config, stages: tuple[str, ...], capacity: Capacity) -> list[str]:
    """Problems of ``stages`` on ``capacity`` (empty = every stage fits), one line per step."""
    gpus = capacity.current().get("GPU", 0.0)
    return [p for a in _asks(cfg, stages, gpus) if (p := fit_problem(a, capacity))]


def local_cpus_needed(cfg: Config, stages: tuple[str, ...], gpus: float = 0.0) -> int:
    """Logical CPUs a private local Ray needs so that the largest step of ``stages`` fits at once."""
    return math.ceil(max((a.total().get("CPU", 0.0) for a in _asks(cfg, stages, gpus)), default=0.0) - _EPS)


def _check_shared_storage(cfg: Config) -> None:
    """On a connected cluster (not a private local Ray): raise ``ResourceError`` when the run's
    ``output_dir`` is a local path and the cluster has several nodes or may add some
    (``jobmode.output_problem``, the rule a Ray job's driver is held to)."""
    import ray

    from .jobmode import JobModeError, check_output_dir

    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    may_add = False
    if nodes <= 1 and not cfg.storage.shared_local and not str(cfg.output_dir).startswith("s3://"):
        capacity = cluster_capacity(local=False)  # one node now: may its autoscaler add more?
        may_add = bool(capacity.node_types or capacity.unknown_autoscaler)
    try:
        check_output_dir(str(cfg.output_dir), cfg.storage.shared_local, nodes=nodes, may_add_nodes=may_add)
    except JobModeError as e:
        raise ResourceError(str(e)) from None


def ensure_ray(cfg: Config, stages: tuple[str, ...]) -> None:
    """Start or join Ray (``runtime.init_ray``) and check that ``stages`` fit; raises ``ResourceError``.

    A private local Ray (no ``RAY_ADDRESS``, Ray not yet started): when every step fits the
    ``max(8, cores)`` logical CPUs ``init_ray`` gives it and asks for no GPU, nothing starts here
    (the stage starts Ray when it needs it, so input errors still come first and fast);
    otherwise Ray starts now with ``max(8, cores, what the largest step needs)`` logical CPUs and
    the GPUs are checked. On a cluster (``RAY_ADDRESS``, or Ray already started), the live nodes
    and the autoscaler's limits are read (``cluster_capacity``); when the autoscaler's limits are
    unknown, a misfit is only logged. Nodes the autoscaler will have to add are logged."""
    import ray

    from .runtime import init_ray

    local = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    if local:
        need = local_cpus_needed(cfg, stages)
        default = max(8, os.cpu_count() or 1)
        if need <= default and not any(a.total().get("GPU") for a in _asks(cfg, stages, 0.0)):
            return
        init_ray(num_cpus=max(default, need))
    else:
        init_ray()
        _check_shared_storage(cfg)
    if os.environ.get(SKIP_ENV, "").lower() in ("1", "true", "yes"):
        log.info("resource check skipped (%s is set)", SKIP_ENV)
        return
    capacity = cluster_capacity(local=local)
    problems = check(cfg, stages, capacity)
    for a in _asks(cfg, stages, capacity.current().get("GPU", 0.0)):
        _, added = place(a, capacity)
        if added:
            log.info("resource check: %s; the autoscaler will add %s", a.describe(),
                     ", ".join(f"{n} × {t}" for t, n in added.items()))
    if not problems:
        return
    if capacity.unknown_autoscaler:
        log.warning("resource check: %s (an autoscaler runs but its limits are unknown: set %s to its "
                    "cluster config to check them); going on", "; ".join(problems), AUTOSCALER_CONFIG_ENV)
        return
    raise ResourceError("not enough resources: " + "\n  ".join(problems))


# ----------------------------------------------------------------------------- formatting

def _add(*dicts: Resources) -> Resources:
    out: Resources = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0.0) + v
    return out


def _num(v: float) -> str:
    if math.isinf(v):
        return "unlimited"
    return f"{v:.2f}".rstrip("0").rstrip(".")


def _fmt(res: Resources, keys: list[str] | None = None) -> str:
    """``{"CPU": 6.25, "GPU": 0}`` -> "6.25 CPU"; ``keys`` lists keys to show even when 0."""
    keys = keys if keys is not None else [k for k, v in res.items() if v]
    order = sorted(keys, key=lambda k: ({"CPU": 0, "GPU": 1}.get(k, 2), k))
    parts = []
    for k in order:
        if k.startswith("accelerator_type:"):
            if k in res:
                parts.append(k.split(":", 1)[1])
            continue
        parts.append(f"{_num(res.get(k, 0.0))} {k}")
    return ", ".join(parts)


def _plural(noun: str) -> str:
    head, _, tail = noun.rpartition(" ")
    word = tail + ("es" if tail.endswith("s") else "s")
    return f"{head} {word}".strip()
