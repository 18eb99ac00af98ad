"""The student before training, and the checks that it can learn from this teacher's corpus.

``prepare_student`` gives the student every worker loads: for ``student.init=prune`` the pruned
baseline ``output_dir/baseline_student/`` (``ensure_baseline``: built in a Ray task by
``prune_to`` from the teacher, rebuilt when what made it, ``baseline_recipe``, changed); for
``init=pretrained`` ``student.model`` itself. ``check_lora_targets`` and ``check_logit_kd`` refuse
a LoRA target the student lacks and logit KD across two token-id spaces (``VocabularyMismatch``),
before anything is trained. The driver reads only metadata files here (config, tokenizer): the
weights are read by a Ray task (pruning) or the workers, never by the driver. Training itself is
``train.stage`` and ``train.worker``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..layout import BASELINE_RECIPE
from .examples import TEACHER_IDS, local_teacher_tokenizer

log = logging.getLogger(__name__)


class VocabularyMismatch(ValueError):
    """Logit KD asked for with a teacher and student that do not share one token-id space."""


@dataclass(frozen=True)
class Student:
    """The student a run trains: ``ref``, what the workers load (an absolute local folder, a hub
    id, or the ``s3://`` folder of an s3 run's baseline); ``dir``, a local folder with its config
    and tokenizer files (``models.model_metadata``; the baseline itself for a local init=prune run)."""
    ref: str
    dir: Path


def baseline_recipe(teacher_ref: str, teacher_dir: str | None, keep_layers: list[int] | None,
                    prune: dict | None = None) -> dict:
    """What a pruned baseline student is made from: the teacher reference, the names and sizes of
    its weight files when it is a local folder (a folder whose weights changed makes another
    student; None for a hub id or ``s3://`` teacher, whose reference names it),
    ``student.keep_layers`` as configured (None = the default choice) and, for
    ``student.prune.method=importance``, ``prune`` (``importance_recipe``; absent for the stride)."""
    from ..model_files import WEIGHT_SUFFIXES

    folder = Path(teacher_dir) if teacher_dir else None
    files = ({f.name: f.stat().st_size for f in sorted(folder.iterdir()) if f.name.endswith(WEIGHT_SUFFIXES)}
             if folder is not None and folder.is_dir() else None)
    recipe = {"teacher": teacher_ref, "teacher_weights": files, "keep_layers": keep_layers}
    return dict(recipe, prune=prune) if prune else recipe


def importance_recipe(cfg: Config) -> dict | None:
    """For ``student.prune.method=importance``: its settings, the data seed that picks the
    calibration rows and the corpus manifest's fingerprint (another corpus: other rows, maybe other
    layers); None for the stride."""
    from ..corpus import MANIFEST
    from ..layout import corpus_location
    from ..stages import fingerprint

    p = cfg.student.prune
    if p.method != "importance":
        return None
    return {"method": "importance", "num_layers": p.num_layers, "calibration_rows": p.calibration_rows,
            "calibration_max_tokens": p.calibration_max_tokens, "seed": cfg.data.seed,
            "corpus_manifest": fingerprint(corpus_location(cfg) / MANIFEST)}


def local_teacher_dir(ref: str) -> str | None:
    """The teacher's folder when it is on this machine (a local path or an embedded model, converted
    here once), else None: a hub id or ``s3://`` teacher is never fetched by the driver."""
    from ..models import EMBEDDED_PREFIX, resolve_model
    from ..storage import is_remote

    if is_remote(ref):
        return None
    resolved = resolve_model(ref)
    return resolved if ref.startswith(EMBEDDED_PREFIX) or Path(resolved).is_dir() else None


def prune_to(teacher_ref: str, keep_layers: list[int] | None, dest_uri: str, storage: dict,
             recipe: dict, calibration_files: list[str] | None = None) -> list[int]:
    """Ray task body: fetch the teacher where this task runs (``models.resolve_model``; an ``s3://``
    teacher: ``storage.local_copy``), write its depth-pruned copy into a temporary folder, then
    replace ``dest_uri`` with it (``storage.publish_folder``): a local destination by renaming a
    sibling folder (stale ones of killed builds are removed first, ``storage.staging_folder``); an
    ``s3://`` one by uploading, with ``BASELINE_RECIPE`` written last, so that a cut upload is
    never taken for a finished one. Returns the kept layers.
    ``teacher_ref``: a local folder as an absolute path (workers do not share the driver's
    working directory). With ``recipe["prune"]`` (method importance) the layers kept are those of
    highest Block Influence on calibration rows read here from ``calibration_files`` (the corpus's
    data shards, URIs), and the recipe written records every layer's score (``scores``)."""
    from ..config import StorageConfig
    from ..models import ModelError, decoder_layers, default_keep_layers, load_for_pruning, prune_student, resolve_model
    from ..storage import local_copy, publish_folder, staging_folder, storage_path

    store = StorageConfig.model_validate(storage)
    dest = storage_path(dest_uri, store)
    teacher_dir = resolve_model(local_copy(teacher_ref, storage))
    model = load_for_pruning(teacher_dir)
    record = dict(recipe)
    if recipe.get("prune"):
        from transformers import AutoTokenizer

        from ..layer_importance import block_influence, calibration_batches, calibration_rows, most_influential

        p = recipe["prune"]
        n = len(decoder_layers(model))
        if (p["num_layers"] or 0) > n:
            raise ModelError(f"student.prune.num_layers={p['num_layers']}: the teacher has {n} layers")
        paths = [storage_path(f, store) for f in calibration_files or []]
        rows = calibration_rows([x.path for x in paths], paths[0].fs if paths else None, p["calibration_rows"],
                                p["seed"])
        if not rows:
            raise ValueError("student.prune.method=importance: the corpus has no answered train row to measure "
                             "the layers' importance on")
        batches = calibration_batches(AutoTokenizer.from_pretrained(teacher_dir), rows, p["calibration_max_tokens"])
        scores = block_influence(model, batches)
        keep_layers = most_influential(scores, p["num_layers"] or len(default_keep_layers(n)))
        record.update(scores=[round(x, 6) for x in scores], calibration_rows_read=len(rows))
    with staging_folder(dest) as tmp:
        built = tmp / dest.name
        keep = prune_student(teacher_dir, keep_layers, built, model=model)
        (built / BASELINE_RECIPE).write_text(json.dumps(dict(record, kept=keep), indent=2))
        publish_folder(built, dest, last=BASELINE_RECIPE)
    return keep


def ensure_baseline(cfg: Config) -> Path:
    """``output_dir/baseline_student`` for init=prune, (re)built when what made it differs from now
    (``baseline_recipe``). The pruning runs in a Ray task (Ray must be running), so the teacher's
    weights reach a worker, never the driver. Returns a local folder with the baseline's metadata
    files (for an ``s3://`` run a copy of only those, ``models.model_metadata``); raises ModelError
    when the teacher cannot be pruned (the task's own error, without Ray's wrapping)."""
    import ray

    from ..layout import baseline_location
    from ..models import ModelError, model_metadata
    from ..storage import storage_path

    dest = baseline_location(cfg)
    if not dest.remote:
        dest = storage_path(dest.local().resolve())  # symlinks resolved: the path the Ray task writes
    local_teacher = local_teacher_dir(cfg.teacher.model)
    recipe = baseline_recipe(cfg.teacher.model, local_teacher, cfg.student.keep_layers, importance_recipe(cfg))
    recipe_file = dest / BASELINE_RECIPE
    previous = json.loads(recipe_file.read_text()) if recipe_file.is_file() else None
    made = (dest / "config.json").is_file()
    keys = [*recipe, *(["prune"] if "prune" not in recipe else [])]  # a stride recipe has no "prune"
    if not (made and previous is not None and all(previous.get(k) == recipe.get(k) for k in keys)):
        if made:
            changed = [k for k in keys if previous is None or previous.get(k) != recipe.get(k)]
            log.warning("train: rebuilding %s: it was made from another %s", dest.uri,
                        " and ".join(changed) if previous else "recipe (no record of what made it)")
        # a local folder by its absolute path (the task's working directory is not the driver's);
        # an embedded model, hub id or s3:// teacher by its reference
        teacher = local_teacher if local_teacher and not cfg.teacher.model.startswith("embedded:") else cfg.teacher.model
        files = None
        if "prune" in recipe:  # the calibration rows: read by the task from the corpus's shards
            from ..corpus import read_manifest
            from ..layout import corpus_location

            corpus = corpus_location(cfg)
            files = [(corpus / f).uri if corpus.remote else str((corpus / f).local().resolve())
                     for f in read_manifest(corpus).get("shards", [])]
        task = ray.remote(num_cpus=1, max_retries=0)(prune_to)
        try:
            keep = ray.get(task.remote(teacher, cfg.student.keep_layers, dest.uri, cfg.storage.model_dump(), recipe,
                                       files))
        except ray.exceptions.RayTaskError as e:
            if isinstance(getattr(e, "cause", None), (ModelError, ValueError)):
                raise e.cause from None
            raise
        log.info("train: pruned student keeps teacher layers %s%s -> %s", keep,
                 " (highest Block Influence)" if "prune" in recipe else "", dest.uri)
    return dest.local() if not dest.remote else model_metadata(dest.uri, cfg.storage)


def prepare_student(cfg: Config) -> Student:
    """The student this run trains (``Student``): for init=prune the pruned baseline
    (``ensure_baseline``; starts Ray, the pruning runs in a Ray task), for init=pretrained
    ``student.model`` resolved (an embedded model converted here; a local folder made absolute:
    Ray Train workers do not run in the driver's working directory) with its metadata files (a hub
    id or ``s3://`` student: fetched, without its weights), so that every check runs for every
    kind of reference; the workers load the weights. Raises ModelError for a student that cannot
    be built or read."""
    from ..layout import baseline_location
    from ..models import model_metadata, resolve_model
    from ..runtime import init_ray

    if cfg.student.init == "prune":
        baseline = baseline_location(cfg)
        init_ray()  # the pruning runs in a Ray task
        student_dir = ensure_baseline(cfg)
        # absolute (Ray tasks and workers run elsewhere); an s3:// run's workers read the run's storage
        return Student(baseline.uri if baseline.remote else str(student_dir), student_dir)
    student_ref = resolve_model(cfg.student.model)
    if Path(student_ref).exists():
        # Ray Train workers do not run in the driver's working directory: hand them absolute paths.
        student_ref = str(Path(student_ref).resolve())
    # Its config and tokenizer files (a hub id or s3:// student: fetched, without its weights),
    # so that every check below runs for every kind of reference; the workers load the weights.
    return Student(student_ref, model_metadata(student_ref, cfg.storage))


def check_lora_targets(cfg: Config, student_dir: Path) -> None:
    """Raise ModelError when ``train.lora.target_modules`` names a module the student lacks
    (checked on the meta device: no weight is read)."""
    from ..models import ModelError, lora_target_problem, meta_model

    if not cfg.train.lora.enabled:
        return
    problem = lora_target_problem(meta_model(student_dir / "config.json"), cfg.train.lora.target_modules)
    if problem:
        raise ModelError(f"train.lora.target_modules: {problem}")


def _embedding_rows(model_dir: str | Path) -> int | None:
    f = Path(model_dir) / "config.json"
    if not f.is_file():
        return None
    cfg = json.loads(f.read_text())
    return cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")


def check_logit_kd(cfg: Config, manifest: dict, student_tokenizer, student_dir: Path, label_source: str,
                   why: str = "") -> None:
    """Refuse ``train.loss=logit_kd`` that cannot work, before any training.

    Raises ValueError when the corpus has no top-k logprobs (``train.kd.teacher=corpus``), and
    ``VocabularyMismatch`` when the teacher and the student do not share one token-id space: their
    tokenizers differ (``chat.tokenizer_fingerprint``), or a teacher id would fall outside the
    student's embedding matrix. An embedding matrix larger than the tokenizer is fine: the ids the
    tokenizers share map to the same rows. The message names both sizes and suggests sequence_kd.
    Runs for every kind of model reference (local folder, ``embedded:``, hub id, ``s3://``): the
    student is read from ``student_dir``, its metadata folder (``models.model_metadata``), and an
    online teacher from its own metadata files; no weight is read.
    """
    from ..chat import tokenizer_fingerprint
    from ..layout import corpus_location

    t = cfg.train
    if t.loss != "logit_kd":
        return
    student_size = len(student_tokenizer)
    rows = _embedding_rows(student_dir)
    if t.kd.teacher == "corpus":
        k = (manifest.get("generation_params") or {}).get("top_k_logprobs") or 0
        if not k:
            raise ValueError("train.loss=logit_kd with train.kd.teacher=corpus needs the teacher's top-k logprobs, "
                             f"and the corpus at {corpus_location(cfg)} has none (generation.top_k_logprobs was 0): "
                             "set generation.top_k_logprobs: 20 in the config file and regenerate with "
                             "`raydistill generate CONFIG --overwrite`, or use train.kd.teacher=online or "
                             "train.loss=sequence_kd")
        if label_source == TEACHER_IDS:
            teacher_rows = manifest.get("teacher_vocab_size")
            if rows is not None and teacher_rows is not None and teacher_rows > rows:
                raise VocabularyMismatch(
                    f"train.loss=logit_kd: the teacher's tokenizer has {teacher_rows} tokens but the student's "
                    f"embedding matrix only {rows} rows: teacher ids past {rows - 1} have no student logit; "
                    "use train.loss=sequence_kd")
            return
        tok = local_teacher_tokenizer(cfg.teacher.model)
        teacher_size = manifest.get("teacher_vocab_size") or (len(tok) if tok is not None else "an unknown number of")
    else:
        from transformers import AutoTokenizer

        from ..models import ModelError, model_metadata

        try:
            teacher_meta = model_metadata(cfg.teacher.model, cfg.storage)  # config and tokenizer files only
        except ModelError as e:
            raise ValueError(f"train.kd.teacher=online: teacher.model: {e}") from e
        tok = AutoTokenizer.from_pretrained(teacher_meta)
        teacher_rows = _embedding_rows(teacher_meta)
        if tokenizer_fingerprint(tok) == tokenizer_fingerprint(student_tokenizer) and \
                (teacher_rows is None or rows is None or min(teacher_rows, rows) >= student_size):
            return
        teacher_size = len(tok)
        why = why or "their vocabularies differ"
    raise VocabularyMismatch(
        f"train.loss=logit_kd needs the teacher and the student to share one token-id space, and they do not: "
        f"the teacher's tokenizer ({cfg.teacher.model}) has {teacher_size} tokens, the student's has "
        f"{student_size} (embedding matrix: {rows} rows){f' and {why}' if why else ''}, so the teacher's "
        "distribution over its ids says nothing about the student's; use train.loss=sequence_kd (it trains "
        "on the teacher's text, tokenized again by the student)")

