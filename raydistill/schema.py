"""The data contracts between stages, written in code.

``PROMPTS_SCHEMA``: prompt rows after reading and splitting (input of generate and evaluate).
``CORPUS_SCHEMA``: the teacher corpus (output of generate, input of train), versioned by
``SCHEMA_VERSION`` and stored in the parquet schema metadata and in ``corpus/manifest.json``.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 2  # 2: prompts/ folder, rejects/, run history (issue 6)

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])

PROMPTS_SCHEMA = pa.schema([
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),          # train | validation | test
    pa.field("task", pa.string(), nullable=False),           # math | nli | qa | summarization | conversation
    pa.field("messages", pa.list_(MESSAGE), nullable=False),  # chat messages sent to the model
    pa.field("reference", pa.string()),                       # reference answer, null if none
])

#: Columns every generation engine returns per row (see ``raydistill.generate``).
GENERATION_FIELDS = [
    pa.field("response", pa.string()),
    # The engine's own generated ids, as many as response_tokens; a "stop" answer ends with the
    # stop token (e.g. <|im_end|>), which `response` (decoded, special tokens skipped) leaves out.
    pa.field("response_token_ids", pa.list_(pa.int32())),
    # stop: ended with a model stop id (its last response token); length: cut at max_new_tokens or
    # where prompt + answer reached max_model_len; error: no answer (see `error`).
    pa.field("finish_reason", pa.string()),
    pa.field("prompt_tokens", pa.int32()),                    # ids the engine read (chat.prompt_ids)
    pa.field("response_tokens", pa.int32()),
    pa.field("latency_s", pa.float64()),                      # seconds from request to last token
    pa.field("batch_id", pa.string()),                        # engine batch the row was answered in
    # Top-k teacher logprobs per generated token: (response_tokens, k) ids and natural-log probs.
    pa.field("top_logprobs_ids", pa.list_(pa.list_(pa.int32()))),
    pa.field("top_logprobs", pa.list_(pa.list_(pa.float32()))),
    pa.field("error", pa.string()),                           # null unless the row failed
]

CORPUS_SCHEMA = pa.schema(
    list(PROMPTS_SCHEMA)
    + GENERATION_FIELDS
    + [
        pa.field("teacher", pa.string(), nullable=False),
        pa.field("generation_params", pa.string(), nullable=False),  # JSON
    ],
    metadata={b"raydistill.schema_version": str(SCHEMA_VERSION).encode()},
)


class SchemaError(ValueError):
    """A table that breaks a data contract; the message lists every problem."""


def validate(table: pa.Table, schema: pa.Schema, source: str) -> None:
    """Check that ``table`` has every column of ``schema`` with the right type and no nulls in
    non-nullable columns. Extra columns are allowed. Raises SchemaError listing every problem."""
    problems = []
    for field in schema:
        if field.name not in table.column_names:
            problems.append(f"missing column {field.name!r} ({field.type})")
            continue
        col = table.column(field.name)
        if not col.type.equals(field.type):
            problems.append(f"column {field.name!r} has type {col.type}, expected {field.type}")
        elif not field.nullable and col.null_count:
            problems.append(f"column {field.name!r} has {col.null_count} null value(s)")
    if problems:
        raise SchemaError(f"{source} does not match the schema:\n  " + "\n  ".join(problems))


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Select and cast ``table``'s columns to ``schema`` (missing nullable columns become nulls)."""
    cols = []
    for field in schema:
        if field.name in table.column_names:
            cols.append(table.column(field.name).cast(field.type))
        elif field.nullable:
            cols.append(pa.nulls(table.num_rows, field.type))
        else:
            raise SchemaError(f"missing column {field.name!r} ({field.type})")
    return pa.Table.from_arrays(cols, schema=schema)


def topk_problem(row_id: str, token_ids, topk_ids, topk_logprobs) -> str | None:
    """Why a corpus row's top-k columns cannot be paired with its answer's token ids (None when
    they can, or when the row has no top-k ids): ``top_logprobs_ids`` and ``top_logprobs`` must
    hold one row per id of ``response_token_ids`` (shape ``(len(ids), k)``), of equal widths, and
    every top-k id must be a real id (>= 0). Checked where generate writes a row and where train
    reads one for logit KD."""
    if topk_ids is None:
        return None
    n = len(token_ids or [])
    if len(topk_ids) != n or topk_logprobs is None or len(topk_logprobs) != n:
        return (f"row {row_id}: {n} answer token ids but {len(topk_ids)} top-k id rows and "
                f"{'no' if topk_logprobs is None else len(topk_logprobs)} top-k logprob rows (one per token needed)")
    for i, (ids, lps) in enumerate(zip(topk_ids, topk_logprobs)):
        if len(ids) != len(lps):
            return f"row {row_id}: token {i} has {len(ids)} top-k ids but {len(lps)} logprobs"
        if any(t is None or t < 0 for t in ids):
            return f"row {row_id}: token {i} has a top-k id that is not a token id ({list(ids)})"
    return None
