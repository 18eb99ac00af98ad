"""Scale on paper: prompts, tokens, GPU-hours, S3 and object-store traffic of one distillation run.

    .venv/bin/python benchmarks/sizing.py                        # the seed's case (defaults below)
    .venv/bin/python benchmarks/sizing.py --conversations 200000 --output-tokens 300 --top-k 20

Nothing runs: the script multiplies the run's sizes by throughput figures and prints a markdown
table (quantity | formula | value; docs/sizing.md's "Scale on paper" is its default output), then one
JSON line with the raw numbers. Defaults: 50,000 customer-support conversations, DeepSeek V3
(671B MoE, 37B active per token, FP8) as the teacher on 8×H200 nodes through vLLM, Qwen2.5-14B
as the student, fully fine-tuned with FSDP on one 8-GPU node, the splits, epochs, batch and
checkpoint settings of ``jobs/configs/support_conversation.yaml``.

Where each figure comes from (``--help`` lists every input):
- Token counts per conversation are assumptions (``--input-tokens``, ``--output-tokens``,
  ``--reference-tokens``): set them from a sample of your data.
- Teacher throughput: a public figure, 5,483 tokens/s (input + output) per 8×H200 node for
  DeepSeek-R1-0528 (same architecture as V3) on vLLM v0.11.0 untuned, ShareGPT prompts (GPUStack
  Performance Lab, docs.gpustack.ai/latest/performance-lab/deepseek-r1/h200/), times raydistill's
  measured efficiency against vLLM's offline engine (0.80, benchmarks/README.md, on CPU). The lower
  bound uses DeepSeek's own production figures (73.7k input tokens/s prefill, 14.8k output tokens/s
  decode per H800 node, github.com/deepseek-ai/open-infra-index, 202502OpenSourceWeek
  day_6_one_more_thing_deepseekV3R1_inference_system_overview.md).
- Top-k logprobs: +45 % generation time (docs/training.md, measured on CPU at k = 20); 2 × (4k + 4 + k/8)
  bytes per answer token in Arrow (int32 ids, float32 logprobs, list offsets, validity bits: 86.6 B
  per column at k = 20, as measured on the demo corpus), 0.925 of that in snappy parquet; the rest
  of a corpus row compressed to 0.53 of its Arrow size there.
- Training: 6 × parameters × tokens FLOPs (forward 2, backward 4), bf16 dense peak 312 TFLOPS per
  A100 (cluster/aws.yaml's gpu_train nodes, p4de; 989 on H100/H200), model FLOPs utilization 0.35 (Llama 3 reports 0.38–0.43 for pretraining on H100,
  arXiv 2407.21783), times Ray Train's measured efficiency against a plain loop (0.88,
  benchmarks/README.md, on CPU). A checkpoint holds the trained weights in float32 and AdamW's two
  moments (12 B per trained parameter; a LoRA run's frozen base is not in it), saved at the steps
  ``raydistill.train.plan.checkpoint_steps`` lists (every ``checkpoint_every_steps``, each epoch
  end when validation runs, and the final step); the final one and student/ also hold the exported
  student in the dtype of training (bf16 on GPU: 2 B per parameter).
- LoRA (``--lora-params``, the adapters' parameters): Qwen2.5-14B with r = 16 on q/k/v/o has
  48 layers × 16 × ((5120 + 5120) × 2 + (5120 + 1024) × 2) = 25.2 M.
"""

from __future__ import annotations

import argparse
import json

TEXT_BYTES_PER_TOKEN = 4.0  # UTF-8 English, ≈ 4 characters per token (the demo corpus: 3.4 in messages, 4.3 in answers)
ROW_FIXED_BYTES = 260  # ids, split, task, finish reason, counts, latency, batch id, teacher, generation_params (demo corpus)
PARQUET_RATIO_TEXT = 0.53  # snappy parquet / Arrow, corpus without logprobs (demo corpus: 56,220 / 106,123 B)
PARQUET_RATIO_LOGPROBS = 0.925  # the two logprob columns (demo corpus: 160.3 / 173.2 B per answer token)
GENERATION_HOPS = 4  # object-store crossings of a row in generation: tokenizer actor → engine → postprocess → writer


def logprob_bytes_per_token(k: int) -> float:
    """Arrow bytes per answer token of ``top_logprobs_ids`` + ``top_logprobs`` (``raydistill.schema``):
    per column k 4-byte values, one 4-byte list offset and k + 1 validity bits."""
    return 0.0 if k == 0 else 2 * (4 * k + 4 + (k + 1) / 8)


def corpus_row_bytes(input_tokens: float, output_tokens: float, reference_tokens: float, k: int) -> float:
    """Arrow bytes of one ``CORPUS_SCHEMA`` row: messages, response and reference as text,
    ``response_token_ids`` (int32), the top-k columns, and the small fixed columns."""
    return (TEXT_BYTES_PER_TOKEN * (input_tokens + output_tokens + reference_tokens) + 4 * output_tokens
            + logprob_bytes_per_token(k) * output_tokens + ROW_FIXED_BYTES)


def _k(text: str) -> int:
    k = int(text)
    if not 0 <= k <= 20:
        raise argparse.ArgumentTypeError(f"{k}: top-k logprobs run from 0 to 20 (vLLM's cap)")
    return k


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Refuse inputs no run can have (with the option's name)."""
    if not (0 <= args.validation < 1 and 0 <= args.test < 1 and args.validation + args.test < 1):
        p.error(f"--validation {args.validation} and --test {args.test}: each in [0, 1) and together below 1")
    for name in ("conversations", "gpus_per_node", "teacher_replicas", "teacher_batch", "concurrent_batches",
                 "epochs", "train_gpus", "batch_size", "grad_accum"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("teacher_tokens_per_s", "raydistill_efficiency", "logprobs_slowdown", "prefill_tokens_per_s",
                 "decode_tokens_per_s", "student_params", "peak_tflops", "mfu", "train_efficiency",
                 "lora_params", "export_bytes",
                 "upload_gb_per_s", "input_tokens", "output_tokens"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    return args


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--conversations", type=int, default=50_000, help="prompts (conversations) in the dataset")
    a("--validation", type=float, default=0.02, help="data.split.validation share")
    a("--test", type=float, default=0.04, help="data.split.test share")
    a("--eval-limit", type=int, default=1000, help="eval.limit (0 = the whole test split)")
    a("--input-tokens", type=float, default=600, help="mean prompt tokens per conversation: system prompt, "
      "history up to the customer's last turn, chat template")
    a("--output-tokens", type=float, default=150, help="mean teacher answer tokens (one agent turn)")
    a("--reference-tokens", type=float, default=150, help="mean reference tokens (the human agent's reply)")
    a("--top-k", type=_k, default=0, help="generation.top_k_logprobs of the run (0: sequence KD; 1-20 for "
      "logit KD: the total then counts the logprobs' generation time, and the corpus rows are for this k)")
    a("--gpus-per-node", type=int, default=8)
    a("--teacher-tokens-per-s", type=float, default=5483, help="input + output tokens/s per teacher node "
      "(GPUStack, vLLM untuned, DeepSeek-R1 on 8×H200, ShareGPT)")
    a("--teacher-replicas", type=int, default=2, help="teacher.replicas: nodes answering at once")
    a("--teacher-batch", type=int, default=128, help="teacher.batch_size (rows per engine batch)")
    a("--concurrent-batches", type=int, default=8, help="teacher.max_concurrent_batches")
    a("--raydistill-efficiency", type=float, default=0.80, help="raydistill generate / vLLM offline tokens/s "
      "(benchmarks/README.md)")
    a("--logprobs-slowdown", type=float, default=1.45, help="generation time with top-20 logprobs / without "
      "(docs/training.md)")
    a("--prefill-tokens-per-s", type=float, default=73_700, help="DeepSeek production, per H800 node")
    a("--decode-tokens-per-s", type=float, default=14_800, help="DeepSeek production, per H800 node")
    a("--student-params", type=float, default=14.7e9, help="Qwen2.5-14B: 14.7 B parameters")
    a("--epochs", type=int, default=2)
    a("--train-gpus", type=int, default=8, help="train.workers (one GPU each)")
    a("--batch-size", type=int, default=4, help="train.batch_size per worker")
    a("--grad-accum", type=int, default=4, help="train.grad_accum_steps")
    a("--checkpoint-every", type=int, default=200, help="train.checkpoint_every_steps")
    a("--lora-params", type=float, default=48 * 16 * (2 * (5120 + 5120) + 2 * (5120 + 1024)),
      help="trained parameters of a LoRA run (the LoRA row): Qwen2.5-14B, r = 16 on q/k/v/o")
    a("--export-bytes", type=float, default=2, help="bytes per parameter of the exported student (the dtype of "
      "training: 2 for bf16 on GPU, 4 for fp32 on CPU)")
    a("--peak-tflops", type=float, default=312, help="bf16 dense peak per GPU: 312 for A100 (the gpu_train "
      "group of cluster/aws.yaml, p4de), 989 for H100/H200 SXM")
    a("--mfu", type=float, default=0.35, help="model FLOPs utilization")
    a("--train-efficiency", type=float, default=0.88, help="Ray Train / plain loop tokens/s (benchmarks/README.md)")
    a("--upload-gb-per-s", type=float, default=0.5, help="S3 upload speed of one training process, GB/s (an "
      "assumption: measure yours); the workers wait while rank 0 writes a checkpoint")
    return p


def _n(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


def _mb(x: float) -> str:
    if x >= 1e11:
        return f"{x / 1e9:,.0f} GB"
    return f"{x / 1e9:,.2f} GB" if x >= 1e9 else f"{x / 1e6:,.0f} MB"


def size(args: argparse.Namespace) -> tuple[list[tuple[str, str, str]], dict]:
    """The table rows (quantity, formula, value) and the raw numbers, from the parsed inputs."""
    n, gpn = args.conversations, args.gpus_per_node
    answered = round(n * (1 - args.test))  # generate answers train + validation
    train_rows = round(n * (1 - args.test - args.validation))
    test_rows = round(n * args.test)
    evaluated = min(args.eval_limit, test_rows) if args.eval_limit else test_rows
    tok_in, tok_out = args.input_tokens, args.output_tokens
    gen_in, gen_out = answered * tok_in, answered * tok_out
    node_tps = args.teacher_tokens_per_s * args.raydistill_efficiency
    gen_node_h = (gen_in + gen_out) / node_tps / 3600
    gen_gpu_h = gen_node_h * gpn
    gen_logprobs_gpu_h = gen_gpu_h * args.logprobs_slowdown
    k = args.top_k
    kk = k or 20  # the top-k figures shown beside the plain ones
    gen_run_gpu_h = gen_logprobs_gpu_h if k else gen_gpu_h
    floor_gpu_h = (gen_in / args.prefill_tokens_per_s + gen_out / args.decode_tokens_per_s) / 3600 * gpn
    eval_gpu_h = evaluated * (tok_in + tok_out) / node_tps / 3600 * gpn
    train_tokens = train_rows * (tok_in + tok_out) * args.epochs
    flops = 6 * args.student_params * train_tokens
    gpu_flops = args.peak_tflops * 1e12 * args.mfu * args.train_efficiency
    train_gpu_h = flops / gpu_flops / 3600
    # the trainer's own counts: steps (equal split, last step of an epoch short) and the steps it saves at
    from raydistill.train.plan import checkpoint_steps, plan_steps

    per_epoch = plan_steps(train_rows, args.train_gpus, args.batch_size, args.grad_accum)[2]
    steps = args.epochs * per_epoch
    saved = checkpoint_steps(steps, per_epoch, args.checkpoint_every, has_validation=args.validation > 0)
    n_ckpt = len(saved)
    ckpt = 12 * args.student_params
    student = args.export_bytes * args.student_params
    ckpt_total = n_ckpt * ckpt + 2 * student  # + the final checkpoint's hf/ and student/
    lora_ckpt = 12 * args.lora_params
    lora_total = n_ckpt * lora_ckpt + 2 * student
    stall_gpu_h = ckpt_total / (args.upload_gb_per_s * 1e9) / 3600 * args.train_gpus
    total_gpu_h = gen_run_gpu_h + train_gpu_h + stall_gpu_h + eval_gpu_h
    row0 = corpus_row_bytes(tok_in, tok_out, args.reference_tokens, 0)
    rowk = corpus_row_bytes(tok_in, tok_out, args.reference_tokens, kk)
    corpus0, corpus20 = answered * row0, answered * rowk
    pq0 = corpus0 * PARQUET_RATIO_TEXT
    pq20 = pq0 + answered * tok_out * logprob_bytes_per_token(kk) * PARQUET_RATIO_LOGPROBS
    prompts_bytes = n * TEXT_BYTES_PER_TOKEN * (tok_in + args.reference_tokens)
    gen_s3_0, gen_s3_20 = 3 * prompts_bytes + 4 * pq0, 3 * prompts_bytes + 4 * pq20
    examples = (train_rows + round(n * args.validation)) * (12 * (tok_in + tok_out) + 4 * tok_out)
    train_s3 = pq0 + examples * (1 + args.epochs) + ckpt_total
    row_run = corpus_row_bytes(tok_in, tok_out, args.reference_tokens, k)
    rows = [
        ("prompts answered by the teacher (train + validation)", "N × (1 − test)", _n(answered)),
        ("prompts trained on / evaluated", "N × (1 − test − validation) / min(eval.limit, N × test)",
         f"{_n(train_rows)} / {_n(evaluated)}"),
        ("generation tokens in / out", "answered × tokens in / out",
         f"{gen_in / 1e6:,.1f} M / {gen_out / 1e6:,.1f} M"),
        ("teacher throughput per node", "public tokens/s × raydistill efficiency",
         f"{_n(args.teacher_tokens_per_s)} × {args.raydistill_efficiency:g} = {_n(node_tps)} tokens/s"),
        ("generation GPU-hours", "(in + out) / node tokens/s / 3600 × GPUs per node", _n(gen_gpu_h, 1)),
        ("generation wall time", f"node-hours / teacher.replicas ({args.teacher_replicas})",
         f"{gen_node_h / args.teacher_replicas:,.2f} h"),
        (f"generation GPU-hours with top-{kk} logprobs", f"× {args.logprobs_slowdown:g} (measured at k = 20)",
         _n(gen_logprobs_gpu_h, 1)),
        ("generation GPU-hours at DeepSeek's production speed (floor)",
         "(in / prefill + out / decode tokens/s) / 3600 × GPUs per node", _n(floor_gpu_h, 1)),
        ("training tokens", "train rows × (in + out) × epochs", f"{train_tokens / 1e6:,.1f} M"),
        ("training FLOPs", "6 × params × training tokens", f"{flops:.2e}"),
        ("training GPU-hours", "FLOPs / (peak × MFU × Ray Train efficiency) / 3600", _n(train_gpu_h, 1)),
        ("training wall time", f"GPU-hours / train.workers ({args.train_gpus})",
         f"{train_gpu_h / args.train_gpus:,.2f} h"),
        ("training state (FSDP-sharded)", "16 B × params (fp32 weights, grads, 2 AdamW moments)",
         f"{_mb(16 * args.student_params)} ({_mb(16 * args.student_params / args.train_gpus)} per GPU)"),
        ("checkpoint stalls, GPU-hours", f"checkpoint bytes / upload {args.upload_gb_per_s:g} GB/s / 3600 × "
         "train.workers", _n(stall_gpu_h, 1)),
        ("evaluation GPU-hours (teacher's answers), a lower bound", "evaluated × (in + out) / node tokens/s / 3600 × GPUs",
         _n(eval_gpu_h, 1)),
        ("**total GPU-hours**", f"generation{f' with top-{k}' if k else ''} + training + stalls + evaluation",
         f"**{_n(total_gpu_h, 1)}**"),
        ("corpus row (Arrow)", "4 B × (in + out + ref) + 4 B × out + 2 (4k + 4 + k/8) B × out + 260 B",
         f"{_n(row0)} B; {_n(rowk)} B with top-{kk}"),
        ("corpus size: Arrow / snappy parquet", "rows × row bytes; × 0.53 (logprobs × 0.925)",
         f"{_mb(corpus0)} / {_mb(pq0)}; top-{kk}: {_mb(corpus20)} / {_mb(pq20)}"),
        ("S3 traffic, generate", "3 × prompts + 4 × corpus parquet (generated/, filter passes, data/)",
         f"{_mb(gen_s3_0)}; top-{kk}: {_mb(gen_s3_20)}"),
        ("checkpoints saved (steps)", ", ".join(
            ([f"every {args.checkpoint_every} steps"] if args.checkpoint_every else [])
            + ([f"each epoch end (every {per_epoch} steps{', where validation runs' if args.validation > 0 else ''})"]
               if args.validation > 0 or not args.checkpoint_every else []) + ["the final step"]),
         f"{n_ckpt}: {', '.join(map(str, saved))}"),
        ("checkpoints (+ student) written to S3", f"checkpoints × 12 B × params + 2 × {args.export_bytes:g} B × params "
         "(final hf/ and student/)", f"{n_ckpt} × {_mb(ckpt)} + 2 × {_mb(student)} = {_mb(ckpt_total)}"),
        ("the same with LoRA (adapters + AdamW state only)", "checkpoints × 12 B × LoRA params + 2 × "
         f"{args.export_bytes:g} B × params (merged student)",
         f"{n_ckpt} × {_mb(lora_ckpt)} + 2 × {_mb(student)} = {_mb(lora_total)}"),
        ("S3 traffic, train", "corpus + examples × (1 + epochs) + checkpoints", _mb(train_s3)),
        ("S3 traffic, evaluate", "student/ copied to the evaluating node", _mb(student)),
        ("object store, generate: through / in flight",
         f"{GENERATION_HOPS} hops × corpus (Arrow); batch × concurrent batches × replicas × row",
         f"{_mb(GENERATION_HOPS * answered * row_run)} / "
         f"{_mb(args.teacher_batch * args.concurrent_batches * args.teacher_replicas * row_run)} (top_k {k})"),
    ]
    raw = {"answered": answered, "train_rows": train_rows, "evaluated": evaluated, "generation_tokens_in": gen_in,
           "generation_tokens_out": gen_out, "teacher_node_tokens_per_s": node_tps,
           "generation_gpu_hours": gen_gpu_h, "generation_gpu_hours_top20": gen_logprobs_gpu_h,
           "generation_gpu_hours_floor": floor_gpu_h, "training_tokens": train_tokens, "training_flops": flops,
           "training_gpu_hours": train_gpu_h, "checkpoint_stall_gpu_hours": stall_gpu_h,
           "evaluation_gpu_hours": eval_gpu_h, "total_gpu_hours": total_gpu_h, "steps": steps,
           "checkpoints": n_ckpt, "checkpoint_steps": saved, "checkpoint_bytes": ckpt,
           "checkpoint_total_bytes": ckpt_total, "lora_checkpoint_bytes": lora_ckpt, "lora_total_bytes": lora_total, "corpus_bytes_arrow": corpus0,
           "corpus_bytes_arrow_top20": corpus20, "corpus_bytes_parquet": pq0, "corpus_bytes_parquet_top20": pq20,
           "s3_generate_bytes": gen_s3_0, "s3_generate_bytes_top20": gen_s3_20, "s3_train_bytes": train_s3,
           "s3_evaluate_bytes": student, "inputs": vars(args)}
    return rows, raw


def table(rows: list[tuple[str, str, str]]) -> str:
    """The rows as a markdown table."""
    lines = ["| quantity | formula | value |", "|---|---|---|"]
    lines += [f"| {q} | {f} | {v} |" for q, f, v in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = _check(parser, parser.parse_args(argv))
    rows, raw = size(args)
    print(table(rows))
    print(json.dumps(raw))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
