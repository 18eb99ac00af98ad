"""The ``hf`` engine: transformers ``generate`` in a Ray Data actor pool, for models or machines
vLLM does not serve."""

from __future__ import annotations

import logging
import math
import time
import uuid

import pyarrow as pa

from ..config import EngineConfig, GenerationConfig

log = logging.getLogger(__name__)

from .common import GENERATED_SCHEMA, chat_messages, engine_dtype, finish_reason_of, model_stop_ids


class HFGenerator:
    """A Ray Data actor that answers prompt batches with transformers ``generate``.

    Prompts are ``chat.prompt_ids`` of each row's messages (the ids the vLLM engine gets), left-padded
    here with an attention mask. Like vLLM, an answer ends at a stop id (``model_stop_ids``, kept as the
    last response token), at ``max_new_tokens``, or when prompt + answer reach
    ``engine.max_model_len``; a prompt of ``max_model_len`` tokens or more gets an error row
    instead of failing the batch. Each actor uses ``threads`` torch threads (Ray would leave it one).
    Latency of a row = wall time of its batch (all answers of a batch return together). A batch
    whose left-padded width + answers would pass ``max_model_len`` runs in several passes
    (``_fitting_groups``), each with its own ``batch_id``.
    """

    def __init__(self, model_dir: str, engine: dict, gen: dict, gpu: bool, storage: dict | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..models import require_chat_template
        from ..storage import local_copy

        # an s3:// model (a student written by train) is fetched on this actor's node
        model_dir = local_copy(model_dir, storage)

        self.engine = EngineConfig.model_validate(engine)
        self.gen = GenerationConfig.model_validate(gen)
        torch.set_num_threads(max(1, math.ceil(self.engine.cpus_per_replica)))
        self.device = "cuda" if gpu else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        require_chat_template(self.tokenizer, model_dir)
        self.stop_ids = model_stop_ids(model_dir)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (min(self.stop_ids) if self.stop_ids else 0)
        dtype = getattr(torch, engine_dtype(self.engine, gpu))
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(self.device).eval()

    def __call__(self, batch: pa.Table) -> pa.Table:
        from ..chat import prompt_ids

        rows = batch.to_pylist()
        batch_id = uuid.uuid4().hex
        limit = self.engine.max_model_len
        encoded = [prompt_ids(self.tokenizer, chat_messages(r["messages"])) for r in rows]
        results: dict[int, dict] = {}
        caps: dict[int, int] = {}  # row -> most new tokens it may get
        for i, ids in enumerate(encoded):
            if len(ids) >= limit:  # vLLM refuses these too: no room for one answer token
                results[i] = dict(response="", response_token_ids=[], finish_reason="error",
                                  prompt_tokens=len(ids), response_tokens=0, latency_s=None,
                                  top_logprobs_ids=None, top_logprobs=None,
                                  error=f"prompt has {len(ids)} tokens; max_model_len is {limit}: "
                                        "no room for an answer")
            else:
                caps[i] = min(self.gen.max_new_tokens, limit - len(ids))
        batch_ids: dict[int, str] = {}
        for group in _fitting_groups(caps, {i: len(encoded[i]) for i in caps}, limit):
            group_id = uuid.uuid4().hex  # each group is one engine pass: its own span for engine_throughput
            results.update(self._generate(group, encoded, caps))
            batch_ids.update({i: group_id for i in group})
        merged = [dict(rows[i], **results[i], batch_id=batch_ids.get(i, batch_id)) for i in range(len(rows))]
        return pa.Table.from_pylist(merged, schema=GENERATED_SCHEMA)

    def _generate(self, ok: list[int], encoded: list[list[int]], caps: dict[int, int]) -> dict[int, dict]:
        """One left-padded ``generate`` over rows ``ok`` (whose width + caps fit max_model_len)."""
        import torch

        results: dict[int, dict] = {}
        width = max(len(encoded[i]) for i in ok)
        input_ids = torch.tensor([[self.pad_id] * (width - len(encoded[i])) + encoded[i] for i in ok],
                                 dtype=torch.long, device=self.device)
        mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in ok],
                            dtype=torch.long, device=self.device)
        t0 = time.perf_counter()
        torch.manual_seed(self.gen.seed)
        k = self.gen.top_k_logprobs
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids, attention_mask=mask, max_new_tokens=max(caps[i] for i in ok),
                do_sample=self.gen.temperature > 0,
                temperature=self.gen.temperature if self.gen.temperature > 0 else None,
                top_p=self.gen.top_p if self.gen.temperature > 0 else None,
                top_k=None, pad_token_id=self.pad_id,
                eos_token_id=sorted(self.stop_ids) or None,
                return_dict_in_generate=True, output_logits=bool(k))
        elapsed = time.perf_counter() - t0
        new = out.sequences[:, width:].tolist()
        for j, i in enumerate(ok):
            toks = new[j][: caps[i]]  # a row's own cap: max_new_tokens or what max_model_len leaves
            stop = next((p for p, t in enumerate(toks) if t in self.stop_ids), None)
            toks = toks[: stop + 1] if stop is not None else toks  # keep the stop token itself
            ids_k = lps_k = None
            if k:
                ids_k, lps_k = [], []
                for p in range(len(toks)):
                    lp = torch.log_softmax(out.logits[p][j].float(), dim=-1)
                    top = torch.topk(lp, k)
                    ids_k.append(top.indices.tolist())
                    lps_k.append(top.values.tolist())
            finish = finish_reason_of(toks, self.stop_ids)
            # Like vLLM, the text leaves the stop token out (even one that is not a special token).
            text = self.tokenizer.decode(toks[:-1] if finish == "stop" else toks, skip_special_tokens=True)
            results[i] = dict(response=text, response_token_ids=toks, finish_reason=finish,
                              prompt_tokens=len(encoded[i]), response_tokens=len(toks),
                              latency_s=elapsed, top_logprobs_ids=ids_k, top_logprobs=lps_k, error=None)
        return results


def _fitting_groups(caps: dict[int, int], lengths: dict[int, int], limit: int) -> list[list[int]]:
    """Rows cut into groups whose left-padded width + largest cap stays within ``limit``
    (max_model_len), so that no row runs past the model's positions (GPT-2 and OPT have position
    embeddings only up to there) and every row still gets its own cap, as in vLLM. Rows are
    taken longest prompt first; with prompts that all leave room for max_new_tokens this is one
    group. Returns lists of row indices."""
    groups: list[list[int]] = []
    width = top = 0
    for i in sorted(caps, key=lambda i: -lengths[i]):
        if groups and width + max(top, caps[i]) <= limit:
            groups[-1].append(i)
            top = max(top, caps[i])
        else:
            groups.append([i])
            width, top = lengths[i], caps[i]
    return [sorted(g) for g in groups]


