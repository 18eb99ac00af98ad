"""Step 4 of the generate stage: every answer written (and failed row) tagged kept or rejected
with its reason (the rules are ``filters``'), the counts per split, finish reason and outcome,
the checks on them (too many failed answers, too few kept), and ``data/`` and ``rejects/``
written from the tags.

It reads ``corpus/generated/`` and ``corpus/errors/``; it does not generate (``answering``) nor
write the manifest (``stage``).
"""

from __future__ import annotations

import logging

import pyarrow as pa

from ..config import Config
from ..corpus import DATA_DIR, GENERATED_DIR, REJECTS_DIR, REJECTS_SCHEMA
from ..runtime import group_totals, shuffle_partitions
from ..schema import CORPUS_SCHEMA, conform
from ..storage import StoragePath
from .resume import ERRORS_DIR, GenerationError

log = logging.getLogger(__name__)

SHARD_ROWS = 50_000  # rows per file of data/ and rejects/ (at least; the last may be smaller)


def outcome_stats(tagged) -> list[dict]:
    """Rows and token sums per (split, finish_reason, reject reason or "kept"): a few rows, whatever
    the corpus size (``runtime.group_totals``: per-block aggregates, summed on the driver)."""
    def outcome(batch: pa.Table) -> pa.Table:
        import pyarrow.compute as pc

        return batch.select(["split", "finish_reason", "prompt_tokens", "response_tokens"]).append_column(
            "outcome", pc.fill_null(batch.column("reject_reason"), "kept"))

    rows = group_totals(tagged.map_batches(outcome, batch_format="pyarrow", batch_size=None),
                        ["split", "finish_reason", "outcome"], ("prompt_tokens", "response_tokens"))
    return [{"split": r["split"], "finish_reason": r["finish_reason"], "outcome": r["outcome"], "count()": r["count"],
             "sum(prompt_tokens)": r["sum_prompt_tokens"], "sum(response_tokens)": r["sum_response_tokens"]}
            for r in rows]


def check_errors(gen, stats: list[dict], max_share: float) -> None:
    total = sum(r["count()"] for r in stats)
    failed = sum(r["count()"] for r in stats if r["finish_reason"] == "error")
    if total and failed / total > max_share:
        first = (gen.filter(lambda r: r["finish_reason"] == "error").select_columns(["prompt_id", "error"]).take(5))
        examples = "; ".join(f"{r['prompt_id']}: {str(r['error'])[:200]}" for r in first)
        raise GenerationError(
            f"{failed} of {total} answers failed ({failed / total:.1%}), more than generation.max_error_share="
            f"{max_share:.0%}; first errors: {examples}. The answers written are kept; the failed prompts are "
            "answered again by the next run: fix the cause (e.g. teacher.max_model_len) and rerun, or raise "
            "generation.max_error_share to keep them as rejects")
    if failed:
        log.warning("generate: %d of %d answers failed (%.1f%%; generation.max_error_share=%.0f%%); they go to "
                    "corpus/rejects/ with reason 'error'", failed, total, 100 * failed / total, 100 * max_share)


WARN_KEPT_SHARE = 0.7  # below this kept share generate warns (Azure's batch jobs fail under 70 % success)

_ADVICE = {
    "error": "the engine failed on these prompts: see the first errors in corpus/errors/ and fix the cause",
    "empty": "the teacher answered with nothing: check its chat template and the prompts, or set filter.empty=false",
    "truncated": "answers were cut: raise generation.max_new_tokens (or teacher.max_model_len), or set "
                 "filter.truncated=false to keep cut answers",
    "no_final_answer": "the teacher's math/QA/NLI answers state no final answer (task_prompts.final_answer_marker): "
                       "check the task prompts (task_prompts, data.system_prompt) or set filter.no_final_answer=false",
    "reference_mismatch": "the teacher disagrees with the references: check data.reference_field and "
                          "data.label_map, or set filter.match_reference=false",
    "duplicate": "the teacher gave identical answers to identical prompts: deduplicate the prompts, or set "
                 "filter.duplicates=false",
}


def check_kept(stats: list[dict], cfg: Config) -> None:
    """Refuse a corpus the filters leave (almost) nothing of, before anything is written to
    ``data/``: no train answer kept, or a kept share below ``generation.min_kept_share``; warn
    below ``WARN_KEPT_SHARE``. The message gives the reject counts per reason, the finish-reason
    counts and the setting to change (``generation.max_new_tokens`` when most answers were cut).

    ``stats``: rows of ``outcome_stats`` (``split``, ``finish_reason``, ``outcome``, ``count()``).
    Raises GenerationError."""
    total = sum(r["count()"] for r in stats)
    if not total:
        return
    kept = sum(r["count()"] for r in stats if r["outcome"] == "kept")
    kept_train = sum(r["count()"] for r in stats if r["outcome"] == "kept" and r["split"] == "train")
    floor = cfg.generation.min_kept_share
    share = kept / total
    if kept_train and share >= floor and share >= WARN_KEPT_SHARE:
        return
    rejects: dict[str, int] = {}
    finish: dict[str, int] = {}
    for r in stats:
        finish[r["finish_reason"]] = finish.get(r["finish_reason"], 0) + r["count()"]
        if r["outcome"] != "kept":
            rejects[r["outcome"]] = rejects.get(r["outcome"], 0) + r["count()"]
    cut = finish.get("length", 0)
    advice = []
    if cut * 2 > total:  # most answers ran into the length limit: the usual cause of every other reason
        advice.append(f"{'every' if cut == total else 'most'} answer{'' if cut == total else 's'} ({cut} of {total}) "
                      f"ran into generation.max_new_tokens={cfg.generation.max_new_tokens} (finish_reason 'length'): "
                      "raise generation.max_new_tokens (or teacher.max_model_len, when prompts are long)")
    for reason, n in sorted(rejects.items(), key=lambda kv: -kv[1]):
        if not (advice and reason in ("truncated", "no_final_answer")):
            advice.append(f"{reason}: {_ADVICE[reason]}")
            break
    what = (f"{kept} of {total} answers ({share:.0%}) pass the filters"
            + ("" if kept_train or not kept else ", none of them in the train split")
            + f"; rejected: {', '.join(f'{k} {v}' for k, v in sorted(rejects.items(), key=lambda kv: -kv[1]))}"
            + f"; finish reasons: {', '.join(f'{k} {v}' for k, v in sorted(finish.items(), key=lambda kv: -kv[1]))}"
            + f". To change: {'; '.join(advice)}")
    if not kept_train or share < floor:
        why = "no usable train answer" if not kept_train else f"below generation.min_kept_share={floor:.0%}"
        raise GenerationError(
            f"generate: {why}: {what}. The answers stay in corpus/generated/: a filter change applies on the "
            "next run without generating again; a generation or teacher change needs --overwrite")
    log.warning("generate: only %s (below %.0f%%; generation.min_kept_share fails the job below a floor)", what,
                100 * WARN_KEPT_SHARE)


def _tag(batch: pa.Table, cfg_json: str, duplicates: frozenset[str]) -> pa.Table:
    from ..config import Config as _Config
    from .filters import reject_reasons

    cfg = _Config.model_validate_json(cfg_json)
    reasons = reject_reasons(batch, cfg).to_pylist()
    ids = batch.column("prompt_id").to_pylist()
    reasons = [r if r is not None or pid not in duplicates else "duplicate" for r, pid in zip(reasons, ids)]
    return batch.append_column("reject_reason", pa.array(reasons, pa.string()))


def _kept(batch: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    return conform(batch.filter(pc.is_null(batch.column("reject_reason"))), CORPUS_SCHEMA)


def _rejected(batch: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    return conform(batch.filter(pc.is_valid(batch.column("reject_reason"))), REJECTS_SCHEMA)


def filter_config(cfg: Config) -> Config:
    """``cfg`` with ``filter.no_final_answer`` off when no task prompt asks for a final answer
    (``data.system_prompt`` replaces them, or ``task_prompts.enabled`` is false)."""
    if cfg.filter.no_final_answer and (cfg.data.system_prompt or not cfg.task_prompts.enabled):
        log.info("generate: filter.no_final_answer is skipped: the prompts carry no task prompt asking for a "
                 "final answer (data.system_prompt is set or task_prompts.enabled is false)")
        return cfg.model_copy(update={"filter": cfg.filter.model_copy(update={"no_final_answer": False})})
    return cfg


def _generated(out: StoragePath):
    """Every answer of ``generated/`` and this run's failed rows of ``errors/``, lazily (disjoint:
    see ``answering._route_errors``; ``run_generate`` checks that they add up to the prompts)."""
    import ray

    gen, errs = out / GENERATED_DIR, out / ERRORS_DIR
    answers = [f.uri for f in gen.files(".parquet")]
    failed = [f.uri for f in errs.files(".parquet")]
    parts = []
    if answers:
        parts.append(ray.data.read_parquet(answers, filesystem=gen.fs))
    if failed:
        parts.append(ray.data.read_parquet(failed, filesystem=errs.fs))
    if not parts:
        return ray.data.from_arrow(CORPUS_SCHEMA.empty_table())
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def tag_answers(cfg: Config, out: StoragePath):
    """Every answer in ``generated/`` (and failed row in ``errors/``) with ``reject_reason``
    (null = kept; see ``filters``). Duplicates are looked for among the answers the other reasons
    keep, so an answer is never rejected as the duplicate of a rejected one."""
    from .filters import duplicate_ids

    cfg = filter_config(cfg)
    ds = _generated(out)
    dupes: frozenset[str] = frozenset()
    if cfg.filter.duplicates:
        first = ds.map_batches(_tag, batch_format="pyarrow",
                               fn_kwargs=dict(cfg_json=cfg.model_dump_json(), duplicates=frozenset()))
        dupes = frozenset(duplicate_ids(first.map_batches(_kept, batch_format="pyarrow", batch_size=None),
                                        partitions=shuffle_partitions(ds.count())))
    return ds.map_batches(_tag, batch_format="pyarrow", fn_kwargs=dict(cfg_json=cfg.model_dump_json(), duplicates=dupes))


def write_filtered(tagged, out: StoragePath) -> None:
    """Step 4: kept answers to ``data/``, rejected ones (with their reason) to ``rejects/``."""
    data, rejects = out / DATA_DIR, out / REJECTS_DIR
    data.delete()
    rejects.delete()
    # Few large shards for the stages that read them (generated/ holds one shard per engine batch).
    tagged.map_batches(_kept, batch_format="pyarrow", batch_size=None).write_parquet(
        data.uri, filesystem=data.fs, min_rows_per_file=SHARD_ROWS)
    tagged.map_batches(_rejected, batch_format="pyarrow", batch_size=None).write_parquet(
        rejects.uri, filesystem=rejects.fs, min_rows_per_file=SHARD_ROWS)
    for folder in (data, rejects):  # Ray writes nothing for no rows: the layout stays the same
        folder.mkdir()
