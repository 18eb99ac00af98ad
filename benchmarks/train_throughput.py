"""Training benchmark (issue 7): one Ray Train worker against a plain torch loop, the memory of
logit KD against sequence KD, and 1 against 2 workers.

    .venv/bin/python benchmarks/train_throughput.py [--rounds 2] [--steps 4] [--tiny]

The student is the demo's: the embedded teacher (``embedded:SmolLM2-135M-Instruct``) depth-pruned
by ``raydistill.models.prune_student`` with the default layers (11 of 30, vocabulary 49,152), full
fine-tuning in float32 on CPU. ``--tiny`` uses the random tiny Llama of the tests
(``tests/conftest.py:build_tiny_model``) instead, for a smoke run.

The data is synthetic and the same for every arm: ``batch × steps × workers`` corpus rows, each a
short chat prompt and a teacher answer of random token ids (``response_token_ids``, the teacher's
token-id space) long enough that the example is cut at ``train.max_seq_len`` = ``--seq-len``
(128): every example is exactly 128 tokens, no padding, the answer part labelled.

1. **Ray Train vs a plain loop** (``ratio``, target ≥ 0.95). Each round runs, each in a fresh
   subprocess and back to back:

   a. *plain*: one process, ``torch.set_num_threads(--threads)``; the corpus rows tokenized by the
      trainer's own functions (``train.examples.tokenize_batch`` + ``collate``), then per step:
      forward, ``losses.distill_loss_sums`` + ``combine``, backward, ``clip_grad_norm_``, AdamW
      step. Step time from before the forward to after the optimizer step, as the trainer
      measures it.
   b. *ray*: ``raydistill.train.stage.run_train`` on that corpus with ``train.workers=1`` and
      ``train.cpus_per_worker=--threads`` (the worker sets as many torch threads): the real data
      path (Ray Data tokenization, ``get_dataset_shard``), DDP wrapping, checkpoint and export.
      Per-step figures from ``train/metrics.jsonl``.

   tokens/s of an arm = tokens of the measured steps / their summed step seconds, the first
   ``--warmup`` steps left out. ``ratio`` = ray / plain, the median over rounds. Both arms time a
   step the same way and both collate the next batch outside it, so the ratio compares the
   training step itself (wrapping, loss, optimizer, the worker's thread count); the Ray arm's
   batch fetching from Ray Data between steps is not in it (``metrics.jsonl`` has no clock
   time to measure it from), nor are start-up, checkpoint and export (``run_train_s`` has the
   whole call).
2. **Peak memory** (``memory``, target ≤ 1.2). One forward + backward of the student on one
   random batch (``--batch-size`` × ``--seq-len``), in a fresh subprocess per loss:
   ``sequence_kd`` (cross-entropy) and ``logit_kd`` (``--topk`` = 20 random teacher ids and
   log-probabilities per answer position, forward KL, ``train.kd`` defaults: alpha 0.5, chunk 256).
   Peak = ``ru_maxrss`` of the process (model load included); ``memory`` = logit_kd / sequence_kd
   peak. ``step_delta_mib`` = peak − RSS just before the step (what the step itself added).
3. **Scaling**: ``run_train`` with ``train.workers=2`` (``cpus_per_worker=--threads`` each) in each
   round beside the 1-worker run of part 1; ``metrics.jsonl``'s ``tokens_per_s`` is already the
   all-rank figure per step. ``scaling`` = 2-worker / 1-worker tokens/s (median over rounds).

The last line printed is one JSON object: ``ratio``, ``memory``, ``scaling`` and the raw figures,
with the machine's load average (``os.getloadavg``) at the start, the end and each run. Progress
goes to stderr. Everything is written under ``--workdir`` (default: a new temporary folder,
removed at the end unless ``--keep``); nothing goes into the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEACHER = "embedded:SmolLM2-135M-Instruct"
PROMPT = "Continue the sequence of tokens below as long as you can."
STEP_LINE = re.compile(r"\[raydistill\] step (\d+)/(\d+)")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


_TMP: list[Path] = []


def child_env(work: Path) -> dict[str, str]:
    """Environment of every subprocess: temp files (Ray's session folder) in a short folder under
    /tmp (Ray's socket paths must stay under 108 characters), a private quiet local Ray, no hub."""
    if not _TMP:
        _TMP.append(Path(tempfile.mkdtemp(prefix="rdt-", dir="/tmp")))
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # always a private local Ray
    env.update({"TMPDIR": str(_TMP[0]), "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled",
                "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))})
    return env


# ----------------------------------------------------------------------------- inputs

def make_student(work: Path, tiny: bool) -> tuple[str, str]:
    """(student folder, teacher reference): the demo's pruned student, or the tests' tiny Llama."""
    if tiny:
        sys.path.insert(0, str(REPO))
        from tests.conftest import build_tiny_model

        folder = work / "tiny-model"
        if not (folder / "config.json").is_file():
            build_tiny_model(folder)
        return str(folder), str(folder)
    from raydistill.models import prune_student, resolve_model

    folder = work / "student"
    if not (folder / "config.json").is_file():
        log("pruning the embedded teacher into the demo student (default layers) ...")
        prune_student(resolve_model(TEACHER), None, folder)
    return str(folder), TEACHER


def write_corpus(output_dir: Path, student: str, teacher: str, rows: int, seq_len: int, seed: int = 0) -> Path:
    """A finished corpus (``CORPUS_SCHEMA`` shard + manifest) under ``output_dir/corpus``: ``rows``
    train rows, one short prompt each and an answer of ``seq_len`` random non-special token ids
    (finish_reason ``length``: no end of turn), so that prompt + answer is cut at ``seq_len``.
    The manifest records the student's tokenizer as the teacher's: the ids are trained as they are."""
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from raydistill.chat import tokenizer_fingerprint
    from raydistill.schema import CORPUS_SCHEMA, SCHEMA_VERSION, conform

    tok = AutoTokenizer.from_pretrained(student)
    special = set(tok.all_special_ids)
    pool = [i for i in range(len(tok)) if i not in special]
    rng = random.Random(seed)
    table = pa.Table.from_pylist([{
        "prompt_id": f"p{i:05d}", "split": "train", "task": "conversation",
        "messages": [{"role": "user", "content": f"{PROMPT} ({i})"}], "reference": None,
        "response": "", "response_token_ids": [rng.choice(pool) for _ in range(seq_len)],
        "finish_reason": "length", "prompt_tokens": 1, "response_tokens": seq_len, "latency_s": 0.0,
        "batch_id": "b0", "error": None, "teacher": teacher, "generation_params": "{}"} for i in range(rows)])
    corpus = output_dir / "corpus"
    (corpus / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(conform(table, CORPUS_SCHEMA), corpus / "data" / "part-00000.parquet")
    (corpus / "manifest.json").write_text(json.dumps({
        "schema_version": SCHEMA_VERSION, "rows": rows, "shards": ["data/part-00000.parquet"],
        "teacher": teacher, "teacher_tokenizer": tokenizer_fingerprint(tok)}))
    return corpus


def write_config(path: Path, output_dir: Path, student: str, teacher: str, args, workers: int, steps: int) -> Path:
    import yaml

    cfg = {"output_dir": str(output_dir),
           "data": {"split": {"validation": 0.0, "test": 0.0}},
           "teacher": {"model": teacher},
           "student": {"init": "pretrained", "model": student},
           "train": {"workers": workers, "cpus_per_worker": args.threads, "batch_size": args.batch_size,
                     "max_seq_len": args.seq_len, "epochs": 1, "max_steps": steps, "lr": args.lr,
                     "loss": "sequence_kd", "delete_checkpoints": True}}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# ----------------------------------------------------------------------------- arms (subprocesses)

def plain_arm(spec: dict) -> dict:
    """(Runs in a subprocess.) The plain single-process loop over the corpus at ``spec["corpus"]``.
    Returns per-step records: tokens, seconds (forward → optimizer step) and end (clock, s)."""
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raydistill.chat import stop_token_ids
    from raydistill.config import TrainConfig
    from raydistill.train.examples import TEACHER_IDS, collate, tokenize_batch, trained_rows
    from raydistill.train.losses import combine, distill_loss_sums

    t = TrainConfig.model_validate(spec["train"])
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(t.seed)
    tok = AutoTokenizer.from_pretrained(spec["student"])
    stops = stop_token_ids(spec["student"]) | ({tok.eos_token_id} if tok.eos_token_id is not None else set())
    corpus = pq.read_table(spec["corpus"])
    examples = trained_rows(tokenize_batch(corpus, tokenizer_dir=spec["student"], max_len=t.max_seq_len,
                                           source=TEACHER_IDS, stop_ids=sorted(stops),
                                           truncated_answers=t.truncated_answers, with_topk=False,
                                           packing=t.packing)).to_pydict()
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.lr, weight_decay=t.weight_decay)
    steps = []
    b = t.batch_size
    for step in range(spec["steps"]):
        rows = {k: v[step * b:(step + 1) * b] for k, v in examples.items()}
        batch = collate(rows, pad_id)  # as the Ray worker does, outside the timed step
        t0 = time.perf_counter()
        ce_n = int((batch["labels"][:, 1:] != -100).sum())
        tokens = int(batch["attention_mask"].sum())
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       attention_mask=batch["attention_mask"]).logits
        s = distill_loss_sums(logits, batch["labels"], chunk_size=t.kd.chunk_size)
        combine(s, 0.0, ce_n, ce_n).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], t.grad_clip)
        opt.step()
        loss = float(s.ce_sum) / max(1, ce_n)
        end = time.perf_counter()
        steps.append({"step": step + 1, "tokens": tokens, "seconds": round(end - t0, 4), "end": end, "loss": loss})
        print(f"[plain] step {step + 1}/{spec['steps']} loss {loss:.4f} {end - t0:.2f}s", file=sys.stderr, flush=True)
    return {"steps": steps, "threads": torch.get_num_threads()}


def memory_arm(spec: dict) -> dict:
    """(Runs in a subprocess.) One forward + backward of the student on a random batch with
    ``spec["loss"]``; returns peak RSS (ru_maxrss) and RSS before the step, in MiB."""
    import torch
    from transformers import AutoModelForCausalLM

    from raydistill.config import KDConfig
    from raydistill.train.losses import combine, distill_loss_sums

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    kd = KDConfig()
    model = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=torch.float32)
    model.train()
    vocab = model.get_output_embeddings().weight.shape[0]
    b, s, k, prompt = spec["batch_size"], spec["seq_len"], spec["topk"], 16
    ids = torch.randint(0, vocab, (b, s))
    labels = ids.clone()
    labels[:, :prompt] = -100
    extra = {}
    if spec["loss"] == "logit_kd":
        lps = torch.log_softmax(torch.randn(b, s, k) * 2, -1).sort(-1, descending=True).values - 0.1
        extra = {"teacher_topk_ids": torch.randint(0, vocab, (b, s, k)), "teacher_topk_logprobs": lps,
                 "kd_mask": labels != -100, "temperature": kd.temperature, "divergence": kd.divergence}
    before_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    before = _rss_mib()
    t0 = time.perf_counter()
    logits = model(input_ids=ids).logits
    sums = distill_loss_sums(logits, labels, chunk_size=kd.chunk_size, **extra)
    alpha = kd.alpha if spec["loss"] == "logit_kd" else 0.0
    combine(sums, alpha, sums.ce_tokens, sums.kd_tokens).backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"loss": spec["loss"], "vocab": vocab, "peak_rss_mib": round(peak, 1), "rss_before_mib": round(before, 1),
            "peak_before_step_mib": round(before_peak, 1), "step_delta_mib": round(peak - before, 1),
            "seconds": round(seconds, 2), "kd_sum": float(sums.kd_sum), "ce_sum": float(sums.ce_sum)}


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def ray_arm(config: str) -> dict:
    """(Runs in a subprocess.) ``run_train`` on the config; returns its summary and metrics."""
    from raydistill.config import load
    from raydistill.train.stage import run_train

    cfg = load(config)
    t0 = time.perf_counter()
    summary = run_train(cfg)
    wall = time.perf_counter() - t0
    metrics = [json.loads(x) for x in (Path(cfg.output_dir) / "train" / "metrics.jsonl").read_text().splitlines()]
    return {"summary": {k: summary[k] for k in ("steps", "examples", "first_loss", "last_loss", "seconds")},
            "metrics": metrics, "run_train_s": round(wall, 2)}


def run_child(kind: str, spec: dict, work: Path, name: str) -> tuple[dict, list[tuple[float, str]]]:
    """Run ``kind`` (plain | memory | ray) in a fresh subprocess of this script; returns its JSON
    result and the (arrival time, line) of every output line. Raises RuntimeError with the log's
    tail when it fails."""
    spec_file, out_file, logfile = work / f"{name}.spec.json", work / f"{name}.out.json", work / f"{name}.log"
    spec_file.write_text(json.dumps(spec))
    cmd = [sys.executable, str(Path(__file__).resolve()), f"_{kind}", str(spec_file), str(out_file)]
    lines: list[tuple[float, str]] = []
    shown: set[str] = set()  # Ray may forward a worker's line twice
    with logfile.open("w") as lf:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=child_env(work), cwd=work, bufsize=1)
        for line in proc.stdout:
            lines.append((time.perf_counter(), line))
            lf.write(line)
            if (STEP_LINE.search(line) or line.startswith("[plain]")) and line not in shown:
                shown.add(line)
                log(f"  {name}: {line.strip()[-110:]}")
        rc = proc.wait()
    if rc != 0 or not out_file.is_file():
        tail = "".join(x for _, x in lines[-40:])
        raise RuntimeError(f"{name}: `{' '.join(cmd)}` exited {rc} (log {logfile}):\n{tail}")
    return json.loads(out_file.read_text()), lines


# ----------------------------------------------------------------------------- figures

def rates(step_tokens: list[int], step_seconds: list[float], warmup: int) -> dict:
    """tokens/s over the steps after ``warmup``: their tokens / their summed step seconds."""
    toks, secs = step_tokens[warmup:], step_seconds[warmup:]
    return {"measured_steps": len(toks), "tokens_per_step": toks[0] if toks else 0,
            "step_seconds": [round(x, 3) for x in secs], "tokens_per_s": round(sum(toks) / sum(secs), 2)}


def run_ray(config: Path, work: Path, name: str, warmup: int, attempts: int = 3) -> dict:
    """``run_train`` in a subprocess; retried when Ray itself fails to start (its raylet must
    register within a fixed 30 s, which a machine under heavy load can miss)."""
    for attempt in range(1, attempts + 1):
        try:
            res, _ = run_child("ray", {"config": str(config)}, work, name)
            break
        except RuntimeError as e:
            if "timed out during startup" not in str(e) or attempt == attempts:
                raise
            log(f"  {name}: Ray did not start (raylet registration timed out, load {load_avg()}); retrying")
    metrics = res["metrics"]
    # metrics.jsonl: tokens_per_s = all-rank tokens of the step / its seconds
    r = rates([round(m["tokens_per_s"] * m["seconds"]) for m in metrics], [m["seconds"] for m in metrics], warmup)
    r["metrics_tokens_per_s"] = [m["tokens_per_s"] for m in metrics]
    r.update(run_train_s=res["run_train_s"], losses=[m["loss"] for m in metrics], load_avg=load_avg(),
             attempts=attempt)
    return r


def run_plain(spec: dict, work: Path, name: str, warmup: int) -> dict:
    res, _ = run_child("plain", spec, work, name)
    st = res["steps"]
    r = rates([s["tokens"] for s in st], [s["seconds"] for s in st], warmup)
    r.update(threads=res["threads"], losses=[round(s["loss"], 6) for s in st], load_avg=load_avg())
    return r


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4), "values": [round(v, 4) for v in values]}


def throughput(args, work: Path, student: str, teacher: str) -> dict:
    """Parts 1 and 3: per round plain, ray (1 worker), ray (2 workers)."""
    from raydistill.config import TrainConfig

    steps, rows1 = args.steps, args.steps * args.batch_size
    rounds = []
    for r in range(args.rounds):
        rec: dict = {}
        out1 = work / f"ray1-{r}"
        shutil.rmtree(out1, ignore_errors=True)
        corpus = write_corpus(out1, student, teacher, rows1, args.seq_len)
        if args.only in (None, "throughput"):
            log(f"round {r + 1}/{args.rounds}: plain loop, {steps} steps × batch {args.batch_size} × "
                f"{args.seq_len} tokens, {args.threads} thread(s)")
            train = TrainConfig(batch_size=args.batch_size, max_seq_len=args.seq_len, lr=args.lr).model_dump()
            rec["plain"] = run_plain({"student": student, "corpus": str(corpus / "data" / "part-00000.parquet"),
                                      "train": train, "threads": args.threads, "steps": steps},
                                     work, f"plain-{r}", args.warmup)
            log(f"  plain: {rec['plain']['tokens_per_s']} tokens/s")
        log(f"round {r + 1}/{args.rounds}: run_train, 1 worker × {args.threads} CPU")
        rec["ray1"] = run_ray(write_config(work / f"ray1-{r}.yaml", out1, student, teacher, args, 1, steps),
                              work, f"ray1-{r}", args.warmup)
        log(f"  ray 1 worker: {rec['ray1']['tokens_per_s']} tokens/s")
        if "plain" in rec:
            rec["ratio"] = round(rec["ray1"]["tokens_per_s"] / rec["plain"]["tokens_per_s"], 4)
            log(f"  ratio ray/plain = {rec['ratio']}")
        if args.only in (None, "scaling"):
            out2 = work / f"ray2-{r}"
            shutil.rmtree(out2, ignore_errors=True)
            write_corpus(out2, student, teacher, rows1 * 2, args.seq_len)
            log(f"round {r + 1}/{args.rounds}: run_train, 2 workers × {args.threads} CPU")
            rec["ray2"] = run_ray(write_config(work / f"ray2-{r}.yaml", out2, student, teacher, args, 2, steps),
                                  work, f"ray2-{r}", args.warmup)
            rec["scaling"] = round(rec["ray2"]["tokens_per_s"] / rec["ray1"]["tokens_per_s"], 4)
            log(f"  ray 2 workers: {rec['ray2']['tokens_per_s']} tokens/s; 2 / 1 workers = {rec['scaling']}")
        for d in (out1, work / f"ray2-{r}"):
            shutil.rmtree(d, ignore_errors=True)  # the exported students are large; the figures are kept
        rounds.append(rec)
    out: dict = {"rounds": rounds}
    for key in ("ratio", "scaling"):
        vals = [x[key] for x in rounds if key in x]
        if vals:
            out[key] = spread(vals)
    for arm in ("plain", "ray1", "ray2"):
        vals = [x[arm]["tokens_per_s"] for x in rounds if arm in x]
        if vals:
            out[f"{arm}_tokens_per_s"] = spread(vals)
    return out


def memory(args, work: Path, student: str) -> dict:
    runs = {}
    for loss in ("sequence_kd", "logit_kd"):
        log(f"memory: one forward + backward, {loss}, batch {args.batch_size} × {args.seq_len}"
            + (f", top-{args.topk}" if loss == "logit_kd" else ""))
        runs[loss], _ = run_child("memory", {"student": student, "loss": loss, "batch_size": args.batch_size,
                                             "seq_len": args.seq_len, "topk": args.topk, "threads": args.threads},
                                  work, f"mem-{loss}")
        log(f"  {runs[loss]}")
    seq, kd = runs["sequence_kd"], runs["logit_kd"]
    return {"runs": runs, "memory": round(kd["peak_rss_mib"] / seq["peak_rss_mib"], 4),
            "step_delta_ratio": round(kd["step_delta_mib"] / seq["step_delta_mib"], 4) if seq["step_delta_mib"] > 0
            else None}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (plain, ray 1, ray 2); median reported")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per arm (default 4)")
    p.add_argument("--warmup", type=int, default=1, help="first steps of each arm left out of tokens/s (default 1)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step and worker (default 8)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the plain loop = train.cpus_per_worker of each Ray worker (default 1)")
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate (default 5e-4)")
    p.add_argument("--topk", type=int, default=20, help="teacher top-k of the logit_kd memory arm (default 20)")
    p.add_argument("--only", choices=["throughput", "memory", "scaling"], help="run one part")
    p.add_argument("--tiny", action="store_true", help="smoke run: the tests' tiny random Llama, 3 steps, 1 round")
    p.add_argument("--workdir", type=Path, help="where runs and logs go (default: a new temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (default: removed at the end)")
    args = p.parse_args(argv)
    if args.tiny:
        args.rounds, args.steps = 1, 3
    if args.warmup < 1 or args.steps <= args.warmup:
        p.error(f"need 1 ≤ --warmup < --steps (got warmup {args.warmup}, steps {args.steps})")
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="rdtrain-", dir="/tmp")))
    work.mkdir(parents=True, exist_ok=True)
    work = work.resolve()
    log(f"work folder {work}; load average {load_avg()} on {os.cpu_count()} cores")
    result: dict = {"ratio": None, "memory": None, "scaling": None,
                    "settings": {k: v for k, v in vars(args).items() if k not in ("workdir", "keep")},
                    "load_avg_start": load_avg(), "cpus": os.cpu_count()}
    t0 = time.perf_counter()
    try:
        student, teacher = make_student(work, args.tiny)
        result["student"] = {"model": "tiny random Llama (tests/conftest.py)" if args.tiny else
                             f"{TEACHER} pruned (prune_student, default layers)"}
        from transformers import AutoConfig

        c = AutoConfig.from_pretrained(student)
        result["student"].update(layers=c.num_hidden_layers, hidden=c.hidden_size, vocab=c.vocab_size)
        if args.only in (None, "throughput", "scaling"):
            tp = throughput(args, work, student, teacher)
            result["throughput"] = tp
            result["ratio"] = tp.get("ratio", {}).get("median")
            result["scaling"] = tp.get("scaling", {}).get("median")
        if args.only in (None, "memory"):
            mem = memory(args, work, student)
            result["memory_runs"] = mem
            result["memory"] = mem["memory"]
    finally:
        result["load_avg_end"] = load_avg()
        result["seconds"] = round(time.perf_counter() - t0, 1)
        if args.keep or args.workdir:
            log(f"outputs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
        for tmp in _TMP:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result), flush=True)
    return result


def _child(kind: str, spec_file: str, out_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    if kind == "_plain":
        res = plain_arm(spec)
    elif kind == "_memory":
        res = memory_arm(spec)
    else:
        res = ray_arm(spec["config"])
    Path(out_file).write_text(json.dumps(res))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    if len(sys.argv) > 1 and sys.argv[1] in ("_plain", "_memory", "_ray"):
        _child(*sys.argv[1:4])
    else:
        main()
