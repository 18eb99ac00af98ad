"""Steps 2 and 3 of the generate stage: the train and validation prompts of ``corpus/prompts/``
through the teacher engine into ``corpus/generated/``, checkpointed by prompt id (a rerun answers
only what is not written), with failed rows routed to ``corpus/errors/`` and an early stop when
the recent error rate passes ``generation.max_error_rate``.

The engines themselves are ``answer.answer_dataset``'s; the filters and the manifest come after
(``filtering``, ``stage``).
"""

from __future__ import annotations

import hashlib
import json
import logging

import pyarrow as pa

from ..config import Config
from ..corpus import GENERATED_DIR, PROMPTS_DIR
from ..schema import CORPUS_SCHEMA, conform
from ..storage import StoragePath
from .resume import CHECKPOINT_DIR, ERRORS_DIR, GenerationError, committed_rows, count_rows, prompt_count

log = logging.getLogger(__name__)


class _StopGeneration(GenerationError):
    """Raised inside the Ray Data job when the recent error rate passed ``generation.max_error_rate``."""



def _corpus_batch(batch: pa.Table, teacher: str, params: str) -> pa.Table:
    n = batch.num_rows
    batch = batch.append_column("teacher", pa.array([teacher] * n, pa.string()))
    batch = batch.append_column("generation_params", pa.array([params] * n, pa.string()))
    return conform(batch, CORPUS_SCHEMA)


def _not_test(batch: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    return batch.filter(pc.not_equal(batch.column("split"), "test"))


class _ErrorWindow:
    """A Ray actor counting the outcomes of the last ``window`` requests (answered prompts, in the
    order their batches finished); ``add`` returns the stop message once more than ``max_rate`` of
    them failed, and keeps returning it."""

    def __init__(self, window: int, max_rate: float):
        from collections import deque

        self.window, self.max_rate = window, max_rate
        self.recent: deque[bool] = deque()
        self.in_window = self.seen = self.failed = 0
        self.stop: str | None = None

    def add(self, failed: list[bool], last_error: str | None) -> str | None:
        if self.stop:
            return self.stop
        for f in failed:
            self.recent.append(f)
            self.in_window += f
            if len(self.recent) > self.window:
                self.in_window -= self.recent.popleft()
            self.seen += 1
            self.failed += f
            if len(self.recent) == self.window and self.in_window > self.max_rate * self.window:
                self.stop = (f"{self.in_window} of the last {self.window} requests failed "
                             f"({self.in_window / self.window:.0%}, more than generation.max_error_rate="
                             f"{self.max_rate:.0%} over generation.error_window={self.window}) after {self.seen} "
                             f"requests of this run; last error: {str(last_error)[:300]}")
                break
        return self.stop


def _route_errors(batch: pa.Table, monitor, errors: StoragePath) -> pa.Table:
    """After the engine: failed rows go to ``errors/`` (not checkpointed, so a rerun answers them
    again) and are counted by the ``_ErrorWindow`` actor ``monitor``; answers go on to be written.
    Raises _StopGeneration when the recent error rate passed ``generation.max_error_rate``."""
    import io

    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import ray

    failed = pc.fill_null(pc.or_kleene(pc.equal(batch.column("finish_reason"), "error"),
                                       pc.is_valid(batch.column("error"))), False)
    bad = batch.filter(failed)
    last_error = None
    # Named by the batch's ids: a retried task replaces its own file (or removes it when the retry
    # failed nowhere), so errors/ holds each batch's last attempt, disjoint from the answers written.
    name = hashlib.sha256("\n".join(sorted(batch.column("prompt_id").to_pylist())).encode()).hexdigest()[:32]
    if bad.num_rows:
        last_error = next((e for e in reversed(bad.column("error").to_pylist()) if e), "no error message")
        buf = io.BytesIO()
        pq.write_table(bad, buf)
        (errors / f"{name}.parquet").write_bytes(buf.getvalue())
    else:
        (errors / f"{name}.parquet").delete()
    stop = ray.get(monitor.add.remote(failed.to_pylist(), last_error))
    if stop:
        raise _StopGeneration(stop)
    return batch.filter(pc.invert(failed))


def _cause(e: BaseException, kind: type) -> BaseException | None:
    """The innermost exception of type ``kind`` in ``e``'s chain, or None. Ray raises a worker's
    exception as a RayTaskError that is also a ``kind`` but whose text is the traceback; the
    original (with the message) is its ``cause``."""
    found, seen = None, set()
    while e is not None and id(e) not in seen:
        if isinstance(e, kind):
            found = e
        seen.add(id(e))
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    return found


def generate_answers(cfg: Config, out: StoragePath, teacher_model: str, to_answer: int) -> None:
    """Step 2: answer the train/validation prompts not yet written into ``corpus/generated/``;
    failed rows go to ``corpus/errors/``. Raises GenerationError when the run stopped early on
    ``generation.max_error_rate`` (what was kept and what is left are in the message)."""
    import ray
    from ray.data.checkpoint import CheckpointConfig

    from .answer import answer_dataset

    stop = monitor = None
    ctx = ray.data.DataContext.get_current()
    ctx.checkpoint_config = CheckpointConfig(
        id_column="prompt_id", checkpoint_path=(out / CHECKPOINT_DIR).uri, override_filesystem=out.fs,
        delete_checkpoint_on_success=False)  # the manifest step removes it, after the filter pass
    try:
        prompts = out / PROMPTS_DIR
        ds = ray.data.read_parquet(prompts.uri, filesystem=prompts.fs)
        # Blocks of one engine batch, so that every replica gets work; the writer bundles them
        # into files of generation.rows_per_file answers.
        ds = ds.map_batches(_not_test, batch_format="pyarrow", batch_size=None)
        ds = ds.repartition(target_num_rows_per_block=cfg.teacher.batch_size)
        answered = answer_dataset(ds, teacher_model, cfg.teacher, cfg.generation)
        params = json.dumps(cfg.generation.model_dump(), sort_keys=True)
        answered = answered.map_batches(_corpus_batch, batch_format="pyarrow", batch_size=None,
                                        fn_kwargs=dict(teacher=cfg.teacher.model, params=params))
        monitor = ray.remote(num_cpus=0)(_ErrorWindow).remote(cfg.generation.error_window,
                                                               cfg.generation.max_error_rate)
        answered = answered.map_batches(_route_errors, batch_format="pyarrow", batch_size=None,
                                        fn_kwargs=dict(monitor=monitor, errors=out / ERRORS_DIR))
        gen = out / GENERATED_DIR
        log.info("generate: answering up to %d prompts with %s (engine %s) -> %s", to_answer, cfg.teacher.model,
                 cfg.teacher.engine, gen)
        try:
            # Files of generation.rows_per_file answers, each committed on its own: far fewer objects
            # than one per engine batch, and a kill redoes only the files being written.
            answered.write_parquet(gen.uri, filesystem=gen.fs, min_rows_per_file=cfg.generation.rows_per_file)
        except Exception as e:
            found = _cause(e, _StopGeneration)
            if found is None:
                raise
            stop = str(found).split("\nFailed to apply UDF transform")[0]  # Ray appends retry advice
    finally:
        ctx.checkpoint_config = None
        if monitor is not None:  # Ray Data's plan keeps a handle: without this the actor outlives the run
            ray.kill(monitor)
    if stop:
        kept = committed_rows(out)
        failed = count_rows(out / ERRORS_DIR)
        total = prompt_count(out)
        raise GenerationError(
            f"generation stopped early: {stop}. Kept: {kept} answers of {total} prompts in corpus/generated/ "
            f"(committed); {total - kept} prompts ({failed} failed, {max(0, total - kept - failed)} not "
            "reached) are answered by the next run: fix the cause (the endpoint, the engine) and rerun "
            "`raydistill generate` with the same settings")
