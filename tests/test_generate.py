"""The generation engines send the same prompt tokens (chat.prompt_ids), read finish_reason the
engine's way, respect max_model_len, and the corpus records its split and provenance.

Reference answers come from a naive greedy loop written from the rule (argmax each step; stop after
a stop id, which is kept; at most min(max_new_tokens, max_model_len - prompt length) tokens)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from raydistill.config import EngineConfig, GenerationConfig
from raydistill.schema import PROMPTS_SCHEMA

from .conftest import CORPUS_TEXT, write_jsonl
from .helpers import tiny_arch

# What the shell gave, before any test ran init_ray (which must not pin it for every engine).
_SHELL_KV = os.environ.get("VLLM_CPU_KVCACHE_SPACE")

SPECIAL = "What does the string <|im_end|> mean in a chat log?"
MAX_LEN, MAX_NEW = 96, 16

LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def build_llama3_model(folder: Path) -> Path:
    """A random-weight tiny Llama whose template starts with ``{{ bos_token }}`` and whose tokenizer
    also adds BOS itself (a TemplateProcessing post-processor), like Llama 3's."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS_TEXT * 5, trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                     pad_token="<|end_of_text|>")
    hf_tok.chat_template = LLAMA3
    folder.mkdir(parents=True, exist_ok=True)
    hf_tok.save_pretrained(folder)
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=len(hf_tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=bos, eos_token_id=hf_tok.eos_token_id,
                      pad_token_id=hf_tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def prompt_table(texts: dict[str, str]) -> pa.Table:
    rows = [{"prompt_id": pid, "split": "train", "task": "qa", "messages": [{"role": "user", "content": t}],
             "reference": None} for pid, t in texts.items()]
    return pa.Table.from_pylist(rows, schema=PROMPTS_SCHEMA)


def greedy_reference(model, ids: list[int], cap: int, stop_ids: set[int]) -> list[int]:
    """Argmax token by token on the unpadded prompt; stop after a stop id (kept) or ``cap`` tokens."""
    import torch

    seq, out = list(ids), []
    with torch.inference_mode():
        for _ in range(cap):
            t = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            out.append(t)
            seq.append(t)
            if t in stop_ids:
                break
    return out


@pytest.fixture(scope="module")
def stop_case(tiny_model, tmp_path_factory):
    """A copy of the tiny model whose generation_config.json adds a second stop id, chosen so that
    the greedy answer to "plain" ends with it: a real "stop" row for both engines
    (a random model almost never emits <|im_end|>). Returns (model dir, prompts, expected answers)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raydistill.chat import prompt_ids, stop_token_ids

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    words = " ".join(CORPUS_TEXT).split()
    near = ""
    for i in range(1000):  # a prompt whose length + MAX_NEW passes MAX_LEN, with room for a few tokens
        near += words[i % len(words)] + " "
        if len(prompt_ids(tok, [{"role": "user", "content": near.strip()}])) >= MAX_LEN - 8:
            break
    texts = {"special": SPECIAL, "plain": "What is 2 plus 3?", "near": near.strip(), "over": "Paris " * 200}
    ids = {k: prompt_ids(tok, [{"role": "user", "content": t}]) for k, t in texts.items()}
    assert MAX_LEN - MAX_NEW < len(ids["near"]) < MAX_LEN - 1 and len(ids["over"]) > MAX_LEN
    caps = {k: min(MAX_NEW, MAX_LEN - len(v)) for k, v in ids.items() if len(v) < MAX_LEN}
    base_stop = stop_token_ids(tiny_model)
    free = {k: greedy_reference(model, ids[k], caps[k], base_stop) for k in caps}
    others = {t for k in ("special", "near") for t in free[k]}
    plain = free["plain"]
    pos = next(p for p in range(len(plain)) if plain[p] not in plain[:p] and plain[p] not in others)
    extra = plain[pos]
    folder = tmp_path_factory.mktemp("models") / "tiny-stop"
    shutil.copytree(tiny_model, folder)
    gc_file = folder / "generation_config.json"
    gc = json.loads(gc_file.read_text())
    gc["eos_token_id"] = [tok.eos_token_id, extra]
    gc_file.write_text(json.dumps(gc))
    stops = stop_token_ids(folder)
    assert stops == base_stop | {extra}
    expected = {k: greedy_reference(model, ids[k], caps[k], stops) for k in caps}
    assert expected["plain"] == plain[: pos + 1] and expected["plain"][-1] == extra
    return folder, texts, ids, caps, expected, stops


def check_rows(rows: dict[str, dict], ids, caps, expected, stops) -> None:
    """The answers of either engine against the reference."""
    for k in caps:
        r = rows[k]
        assert r["error"] is None, (k, r["error"])
        assert r["prompt_tokens"] == len(ids[k]), k
        assert r["response_token_ids"] == expected[k], k
        assert r["response_tokens"] == len(expected[k])
        want = "stop" if expected[k][-1] in stops else "length"
        assert r["finish_reason"] == want, k
    assert rows["plain"]["finish_reason"] == "stop" and rows["plain"]["response_token_ids"][-1] in stops
    # prompt + answer reach max_model_len: fewer than max_new_tokens tokens, and "length"
    assert rows["near"]["finish_reason"] == "length"
    assert rows["near"]["response_tokens"] == MAX_LEN - len(ids["near"]) < MAX_NEW
    assert rows["special"]["finish_reason"] == "length" and rows["special"]["response_tokens"] == MAX_NEW
    over = rows["over"]
    assert over["finish_reason"] == "error" and over["response_token_ids"] == [] and over["latency_s"] is None
    assert over["prompt_tokens"] == len(ids["over"])


def check_special_prompt(tok, ids: list[int]) -> None:
    """The special-token text stays text: one <|im_end|> id (the template's, closing the user turn),
    and the whole question decodes back."""
    from raydistill.chat import prompt_ids

    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert ids == prompt_ids(tok, [{"role": "user", "content": SPECIAL}])
    assert ids.count(im_end) == 1  # the template's, closing the user turn after the whole question
    assert tok.decode(ids[: ids.index(im_end)]).endswith("user\n" + SPECIAL)
    # what the rendered text tokenized whole would have sent: the user turn ends early
    rendered = tok.apply_chat_template([{"role": "user", "content": SPECIAL}], add_generation_prompt=True,
                                       tokenize=False)
    assert tok(rendered, add_special_tokens=False)["input_ids"].count(im_end) == 2


# ----------------------------------------------------------------------------- units

def test_finish_reason_is_read_from_the_last_token():
    from raydistill.generate.common import finish_reason_of

    assert finish_reason_of([5, 9, 2], {2}) == "stop"
    assert finish_reason_of([5, 2, 9], {2}) == "length"  # a stop id mid-answer cannot happen; only the end counts
    assert finish_reason_of([5, 9], {2, 7}) == "length"
    assert finish_reason_of([], {2}) == "length"


def test_vllm_env_gives_each_engine_its_own_kv_cache(monkeypatch):
    from raydistill.config import Config
    from raydistill.generate.vllm_engine import _vllm_config
    from raydistill.runtime import vllm_env

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")  # e.g. left in the shell, or by an earlier engine
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")
    assert vllm_env(1)["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert vllm_env(3.0)["VLLM_CPU_KVCACHE_SPACE"] == "3"
    assert vllm_env(2.5)["VLLM_CPU_KVCACHE_SPACE"] == "3"  # whole GiB, rounded up
    assert vllm_env(0.25)["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert "VLLM_CPU_KVCACHE_SPACE" not in vllm_env()  # what init_ray exports to every process
    assert vllm_env(1)["VLLM_CPU_OMP_THREADS_BIND"] == "0"  # a user's core binding still wins
    cfg = Config.model_validate({"teacher": {"kv_cache_gib": 1}, "eval": {"kv_cache_gib": 4}})
    gen = GenerationConfig()
    envs = {name: _vllm_config("/nonexistent/model", engine, gen, gpu=False).runtime_env["env_vars"]
            for name, engine in (("teacher", cfg.teacher), ("eval", cfg.eval))}
    assert envs["teacher"]["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert envs["eval"]["VLLM_CPU_KVCACHE_SPACE"] == "4"


def test_vllm_gpu_settings_reach_the_engine_config():
    """tensor/pipeline parallel size, GPU memory share and accelerator type go to ray.data.llm;
    on CPU the engine takes a CPU bundle and none of the GPU settings."""
    from raydistill.config import Config
    from raydistill.generate.vllm_engine import _vllm_config

    cfg = Config.model_validate({"teacher": {"tensor_parallel_size": 4, "pipeline_parallel_size": 2,
                                             "gpu_memory_utilization": 0.85, "accelerator_type": "H100"}})
    gpu = _vllm_config("/m", cfg.teacher, GenerationConfig(), gpu=True)
    assert gpu.engine_kwargs["tensor_parallel_size"] == 4 and gpu.engine_kwargs["pipeline_parallel_size"] == 2
    assert gpu.engine_kwargs["gpu_memory_utilization"] == 0.85 and gpu.accelerator_type == "H100"
    assert gpu.engine_kwargs["dtype"] == "bfloat16" and gpu.placement_group_config is None
    cpu = _vllm_config("/m", cfg.teacher, GenerationConfig(), gpu=False)
    assert "gpu_memory_utilization" not in cpu.engine_kwargs and cpu.accelerator_type is None
    assert cpu.placement_group_config["bundles"] == [{"CPU": 1.0, "GPU": 0.0}] and cpu.engine_kwargs["dtype"] == "float32"
    # a fixed pool of `replicas` engines (what the resource precheck counts), not Ray's 1..n autoscaling pool
    assert _vllm_config("/m", cfg.teacher.model_copy(update={"replicas": 3}), GenerationConfig(),
                        gpu=True).get_concurrency() == {"min_size": 3, "max_size": 3}
    # an s3:// model: the engine actors' boto3 (Ray LLM's downloader) goes to storage.endpoint_url
    from raydistill.config import StorageConfig

    s3 = _vllm_config("s3://b/student", cfg.eval, GenerationConfig(), gpu=False,
                      storage=StorageConfig(endpoint_url="http://127.0.0.1:9000", region="eu-west-1"))
    assert s3.model_source == "s3://b/student"
    assert {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_REGION": "eu-west-1"}.items() <= s3.runtime_env["env_vars"].items()
    ev = _vllm_config("/m", cfg.eval, GenerationConfig(), gpu=True)  # eval's engine has no pp/accelerator fields
    assert ev.engine_kwargs["pipeline_parallel_size"] == 1 and ev.accelerator_type is None


@pytest.mark.gpu
def test_vllm_teacher_on_gpu_with_tensor_parallel(tmp_path, tiny_model, ray_local):
    """A real vLLM engine on the GPUs this machine has (tensor_parallel_size = their count, up to 2)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from raydistill.config import Config
    from raydistill.generate import generate_table

    tp = 2 if torch.cuda.device_count() >= 2 else 1
    cfg = Config.model_validate({"teacher": {"tensor_parallel_size": tp, "gpu_memory_utilization": 0.3,
                                             "batch_size": 4, "max_model_len": 256}})
    prompts = pa.Table.from_pylist([{"prompt_id": f"p{i}", "split": "train", "task": "conversation",
                                     "messages": [{"role": "user", "content": f"Hello {i}"}], "reference": None}
                                    for i in range(8)], schema=PROMPTS_SCHEMA)
    out = generate_table(prompts, str(tiny_model), cfg.teacher, GenerationConfig(max_new_tokens=8))
    assert out.column("prompt_id").to_pylist() == [f"p{i}" for i in range(8)]
    assert all(e is None for e in out.column("error").to_pylist())
    assert all(n > 0 for n in out.column("response_tokens").to_pylist())


def test_init_ray_does_not_pin_the_kv_cache(ray_local):
    assert os.environ.get("VLLM_CPU_KVCACHE_SPACE") == _SHELL_KV


# ----------------------------------------------------------------------------- hf engine

def test_hf_engine_sends_prompt_ids_stops_like_vllm_and_caps_at_max_model_len(stop_case):
    from transformers import AutoTokenizer

    from raydistill.generate import GENERATED_SCHEMA, HFGenerator

    folder, texts, ids, caps, expected, stops = stop_case
    engine = EngineConfig(engine="hf", max_model_len=MAX_LEN, batch_size=8)
    gen = GenerationConfig(max_new_tokens=MAX_NEW, top_k_logprobs=2)
    actor = HFGenerator(str(folder), engine.model_dump(), gen.model_dump(), gpu=False)
    out = actor(prompt_table(texts))
    assert out.schema.equals(GENERATED_SCHEMA)
    rows = {r["prompt_id"]: r for r in out.to_pylist()}
    check_rows(rows, ids, caps, expected, stops)
    assert "prompt has" in rows["over"]["error"] and f"max_model_len is {MAX_LEN}" in rows["over"]["error"]
    tok = AutoTokenizer.from_pretrained(folder)
    check_special_prompt(tok, ids["special"])
    for k in caps:
        assert len(rows[k]["top_logprobs"]) == rows[k]["response_tokens"]
    # the text leaves the stop token out; the ids keep it
    assert rows["plain"]["response"] == tok.decode(expected["plain"][:-1], skip_special_tokens=True)


def test_run_generate_writes_the_split_and_its_provenance(tiny_model, tmp_path, ray_local):
    """hf engine through the stage: prompts/ holds every prompt with its split, the manifest
    the teacher's tokenizer, stop ids, finish reasons and data settings; the corpus row of a prompt
    spelling <|im_end|> shows the whole prompt reached the teacher."""
    from transformers import AutoTokenizer

    from raydistill.chat import prompt_ids, stop_token_ids, tokenizer_fingerprint
    from raydistill.config import load
    from raydistill.corpus import read_corpus, read_prompts
    from raydistill.data import split_key, split_of
    from raydistill.generate import run_generate

    def split(text):  # the split hashes the messages, not the id
        return split_of(split_key([{"role": "user", "content": text}]), 3, 0.2, 0.3)

    rows = [{"qid": f"q{i}", "question": f"Tell me fact number {i} about Paris."} for i in range(24)]
    assert split(SPECIAL) == "train"  # data.seed=3 puts it there: its answer is in the corpus
    rows.append({"qid": "special", "question": SPECIAL})
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"),
        "data": {"path": str(data), "prompt_field": "question", "id_field": "qid", "seed": 3,
                 "split": {"validation": 0.2, "test": 0.3}},
        "teacher": {"model": str(tiny_model), "engine": "hf", "batch_size": 8, "max_model_len": 128},
        "generation": {"max_new_tokens": 8},
        "filter": {"empty": False},  # a random model may answer with the stop token alone
    }))
    cfg = load(cfg_file)
    manifest = run_generate(cfg)
    corpus = Path(cfg.output_dir) / "corpus"
    table, on_disk = read_corpus(corpus)
    assert on_disk == manifest
    prompts = read_prompts(corpus)
    assert sorted(p.name for p in corpus.iterdir()) == ["_runs", "_settings.json", "config.yaml", "data", "manifest.json",
                                                        "prompts", "rejects"]
    want = {r["qid"]: split(r["question"]) for r in rows}
    assert dict(zip(prompts.column("prompt_id").to_pylist(), prompts.column("split").to_pylist())) == want
    assert "test" in want.values()
    test_ids = {p for p, s in want.items() if s == "test"}
    assert set(read_prompts(corpus, ("test",)).column("prompt_id").to_pylist()) == test_ids
    assert not test_ids & set(table.column("prompt_id").to_pylist())
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert manifest["teacher_tokenizer"] == tokenizer_fingerprint(tok)
    assert manifest["stop_token_ids"] == sorted(stop_token_ids(tiny_model)) == [tok.eos_token_id]
    reasons = table.column("finish_reason").to_pylist()
    assert manifest["finish_reasons"] == {r: reasons.count(r) for r in ("stop", "length", "error")}
    assert sum(manifest["finish_reasons"].values()) == manifest["rows_generated"] == len(want) - len(test_ids)
    assert table.num_rows == manifest["rows"] == manifest["rows_generated"] - sum(manifest["rejects"].values())
    assert [r["rows_added"] for r in manifest["runs"]] == [manifest["rows_generated"]]
    d = manifest["data"]
    assert (d["path"], d["seed"], d["split"], d["id_field"], d["prompt_field"], d["prompt_template"], d["limit"]) == \
        (str(data), 3, {"validation": 0.2, "test": 0.3}, "qid", "question", None, None)
    row = next(r for r in table.to_pylist() if r["prompt_id"] == "special")
    assert row["messages"][-1]["content"] == SPECIAL and row["error"] is None
    assert row["prompt_tokens"] == len(prompt_ids(tok, row["messages"]))
    check_special_prompt(tok, prompt_ids(tok, row["messages"]))


# ----------------------------------------------------------------------------- vLLM engine

def _vllm_raw_rows(model_dir, texts, engine, gen) -> dict[str, dict]:
    import ray

    from raydistill.generate.vllm_engine import _vllm_outputs

    ds = _vllm_outputs(ray.data.from_arrow(prompt_table(texts)), str(model_dir), engine, gen, gpu=False)
    return {r["prompt_id"]: r for r in ds.take_all()}


@pytest.mark.vllm
def test_vllm_engine_sends_prompt_ids_stops_and_caps_at_max_model_len(stop_case, ray_local):
    """vLLM reads exactly chat.prompt_ids; keeps the stop token in its output ids; stops at
    max_model_len with fewer than max_tokens tokens; refuses a prompt longer than max_model_len."""
    from transformers import AutoTokenizer

    from raydistill.generate import GENERATED_SCHEMA
    from raydistill.generate.vllm_engine import _vllm_row
    from raydistill.schema import conform

    folder, texts, ids, caps, expected, stops = stop_case
    engine = EngineConfig(engine="vllm", max_model_len=MAX_LEN, batch_size=8, max_concurrent_batches=1,
                          kv_cache_gib=1)
    gen = GenerationConfig(max_new_tokens=MAX_NEW, top_k_logprobs=2)
    raw = _vllm_raw_rows(folder, texts, engine, gen)
    for k in caps:  # what the engine itself read
        assert list(raw[k]["prompt_token_ids"]) == ids[k], k
        assert raw[k]["num_input_tokens"] == len(ids[k])
    assert list(raw["plain"]["generated_tokens"])[-1] in stops  # vLLM keeps the stop token
    assert raw["near"]["num_generated_tokens"] == MAX_LEN - len(ids["near"])  # capped, not refused
    assert f"maximum context length is {MAX_LEN} tokens" in raw["over"]["__inference_error__"]  # refused
    rows = {k: _vllm_row(r, k=2, stop_ids=stops) for k, r in raw.items()}
    table = conform(pa.Table.from_pylist(list(rows.values())), GENERATED_SCHEMA)  # what generate_table returns
    rows = {r["prompt_id"]: r for r in table.to_pylist()}
    check_rows(rows, ids, caps, expected, stops)
    tok = AutoTokenizer.from_pretrained(folder)
    check_special_prompt(tok, list(raw["special"]["prompt_token_ids"]))
    assert rows["plain"]["response"] == tok.decode(expected["plain"][:-1], skip_special_tokens=True)
    for k in caps:
        assert len(rows[k]["top_logprobs"]) == rows[k]["response_tokens"]


@pytest.mark.vllm
def test_llama3_template_bos_once_in_every_engine(tmp_path, ray_local):
    """A template that writes its own BOS, with a tokenizer that adds one too: chat.prompt_ids, the hf
    engine and the vLLM engine all use the same ids, with exactly one BOS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raydistill.chat import prompt_ids, stop_token_ids
    from raydistill.generate import HFGenerator

    folder = build_llama3_model(tmp_path / "llama3-style")
    tok = AutoTokenizer.from_pretrained(folder)
    bos = tok.bos_token_id
    assert tok("hi")["input_ids"][0] == bos  # the tokenizer adds BOS on its own
    texts = {"a": "What is 2 plus 3?", "b": "The sky is blue because of scattering."}
    msgs = {k: [{"role": "user", "content": t}] for k, t in texts.items()}
    ids = {k: prompt_ids(tok, m) for k, m in msgs.items()}
    for k, m in msgs.items():
        assert ids[k][0] == bos and ids[k].count(bos) == 1
        rendered = tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
        assert tok(rendered)["input_ids"][:2] == [bos, bos]  # the double BOS a text prompt would get

    engine = EngineConfig(engine="hf", max_model_len=MAX_LEN, batch_size=8)
    gen = GenerationConfig(max_new_tokens=8)
    hf_rows = {r["prompt_id"]: r for r in HFGenerator(str(folder), engine.model_dump(), gen.model_dump(),
                                                      gpu=False)(prompt_table(texts)).to_pylist()}
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    stops = stop_token_ids(folder)
    for k in texts:
        assert hf_rows[k]["prompt_tokens"] == len(ids[k])
        assert hf_rows[k]["response_token_ids"] == greedy_reference(model, ids[k], 8, stops)

    vengine = engine.model_copy(update={"engine": "vllm", "max_concurrent_batches": 1, "kv_cache_gib": 1})
    raw = _vllm_raw_rows(folder, texts, vengine, gen)
    for k in texts:
        assert list(raw[k]["prompt_token_ids"]) == ids[k]  # one BOS in vLLM too
        assert list(raw[k]["generated_tokens"]) == hf_rows[k]["response_token_ids"]


def test_hf_engine_batch_stays_within_max_model_len_for_absolute_positions(tiny_model, tmp_path):
    """GPT-2 has position embeddings up to n_positions (128 here): a left-padded batch of a long and
    a short prompt must not run past max_model_len (it raised IndexError for the whole batch)."""
    from transformers import AutoTokenizer

    from raydistill.chat import prompt_ids
    from raydistill.config import EngineConfig, GenerationConfig
    from raydistill.generate import HFGenerator


    model_dir = tiny_arch(tmp_path / "gpt2", "gpt2", tiny_model)
    tok = AutoTokenizer.from_pretrained(model_dir)
    long_text = "Paris " * 200
    while len(prompt_ids(tok, [{"role": "user", "content": long_text}])) > 120:
        long_text = long_text[:-6]
    gen = HFGenerator(str(model_dir), EngineConfig(engine="hf", max_model_len=128).model_dump(),
                      GenerationConfig(max_new_tokens=20).model_dump(), gpu=False)
    out = gen(prompt_table({"long": long_text, "short": "Hello"})).to_pylist()
    by_id = {r["prompt_id"]: r for r in out}
    assert all(r["error"] is None for r in out)
    long_row = by_id["long"]
    assert long_row["prompt_tokens"] + long_row["response_tokens"] <= 128
    assert long_row["finish_reason"] == "length" or long_row["response_token_ids"][-1] in gen.stop_ids
    # the short prompt still gets its own cap (as in vLLM), in a pass of its own
    short = by_id["short"]
    assert short["response_tokens"] == 20 or short["finish_reason"] == "stop"
    assert short["batch_id"] != long_row["batch_id"]


def test_fitting_groups_keep_every_row_within_max_model_len():
    from raydistill.generate.hf_engine import _fitting_groups

    lengths = {0: 120, 1: 5, 2: 100, 3: 6}
    caps = {i: min(20, 128 - n) for i, n in lengths.items()}
    groups = _fitting_groups(caps, lengths, 128)
    assert sorted(i for g in groups for i in g) == [0, 1, 2, 3]
    for g in groups:
        assert max(lengths[i] for i in g) + max(caps[i] for i in g) <= 128
    # prompts that all leave room for max_new_tokens: one pass, as before
    assert _fitting_groups({0: 20, 1: 20}, {0: 50, 1: 10}, 128) == [[0, 1]]
