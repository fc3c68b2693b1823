from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from elora_fed.errors import ConfigError, ModelLoadError
from elora_fed.model import models
from elora_fed.model.adapters import adapter_state, attach_lora
from elora_fed.model.config import AdapterConfig, ModelConfig
from elora_fed.model.models import convert_gguf, load_base_model, resolve_model

TINY = ModelConfig(name="tiny-random")


@pytest.mark.parametrize(("precision", "dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_tiny_model_loads_frozen_in_each_dense_precision(precision, dtype):
    model = load_base_model(ModelConfig(name="tiny-random", precision=precision))
    assert model.config.num_hidden_layers == 2
    assert all(p.dtype == dtype and not p.requires_grad for p in model.parameters())


def test_nf4_uses_bitsandbytes_4bit_layers_with_double_quantization():
    model = load_base_model(ModelConfig(name="tiny-random", precision="nf4"))
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    state = q_proj.weight.quant_state
    assert state.quant_type == "nf4" and state.nested  # nested = double quantization
    dense = load_base_model(TINY)
    ids = torch.arange(10, 40).unsqueeze(0)
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, dense(input_ids=ids).logits
    assert not torch.equal(a, b) and torch.allclose(a, b, atol=0.2)  # quantized, yet the same function


def test_lora_initial_weights_come_from_the_seed_alone():
    def adapter(seed):
        torch.manual_seed(1234 + seed)  # the global RNG state must not matter
        return adapter_state(attach_lora(load_base_model(TINY), AdapterConfig(seed=seed)))

    first, again, other = adapter(0), adapter(0), adapter(1)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    a_names = [k for k in first if "lora_A" in k]
    assert a_names and not all(torch.equal(first[k], other[k]) for k in a_names)
    assert all(not first[k].any() for k in first if "lora_B" in k)  # B starts at zero


def test_lora_rank_and_target_modules_are_configurable():
    qv = adapter_state(attach_lora(load_base_model(TINY), AdapterConfig(rank=4)))
    everything = adapter_state(attach_lora(load_base_model(TINY), AdapterConfig(rank=8, target_modules="all-linear")))
    assert {k.split(".")[-4] for k in qv} == {"q_proj", "v_proj"}
    assert {k.split(".")[-4] for k in everything} >= {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"}
    assert next(v for k, v in everything.items() if "lora_A" in k).shape[0] == 8
    with pytest.raises(ConfigError, match="adapter.target_modules = 'nonexistent_proj'"):
        attach_lora(load_base_model(TINY), AdapterConfig(target_modules="nonexistent_proj"))


def test_missing_and_invalid_model_paths_are_named(tmp_path):
    with pytest.raises(ModelLoadError, match="model path .*/no/such/model does not exist"):
        resolve_model(str(tmp_path / "no" / "such" / "model"))
    with pytest.raises(ModelLoadError, match="has no config.json"):
        resolve_model(str(tmp_path))


def test_unknown_hub_id_offline_suggests_the_embedded_default(monkeypatch):
    with pytest.raises(ModelLoadError, match="Use the embedded default model.name = 'smollm2-135m-instruct'"):
        load_base_model(ModelConfig(name="nobody-here/no-such-model"))


def test_corrupt_and_truncated_gguf_files_are_named(tmp_path):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a model at all" * 100)
    with pytest.raises(ModelLoadError, match="does not start with the GGUF magic"):
        convert_gguf(garbage, tmp_path / "out")
    truncated = tmp_path / "truncated.gguf"
    with models.embedded_gguf_path().open("rb") as f:
        truncated.write_bytes(f.read(2_000_000))  # the first 2 MB of the real file
    with pytest.raises(ModelLoadError, match="corrupt or truncated GGUF model file .*truncated.gguf"):
        convert_gguf(truncated, tmp_path / "out")
    with pytest.raises(ModelLoadError, match="GGUF model file not found"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _read_tiny_as_if_gguf(monkeypatch, interrupt_tokenizer_save: bool) -> None:
    """Replace the GGUF read by the tiny model (the real read is exercised in test_smollm2)."""
    tiny_dir = str(models.tiny_model_dir())
    load_model, load_tokenizer = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained

    def model_from_gguf(folder, gguf_file, **kwargs):
        model = load_model(tiny_dir, **kwargs)
        model.config.quantization_config = {"quant_method": "gguf"}  # what a GGUF load carries
        return model

    def tokenizer_from_gguf(folder, gguf_file):
        tokenizer = load_tokenizer(tiny_dir)
        if interrupt_tokenizer_save:  # killed after the weights were written
            tokenizer.save_pretrained = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt)
        return tokenizer

    monkeypatch.setattr(models, "_check_gguf", lambda path: None)
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", model_from_gguf)
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", tokenizer_from_gguf)


def test_an_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    _read_tiny_as_if_gguf(monkeypatch, interrupt_tokenizer_save=True)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(tmp_path / "model.gguf", tmp_path / "cache" / "converted")
    assert list((tmp_path / "cache").iterdir()) == []


def test_conversion_writes_a_plain_hf_directory(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        _read_tiny_as_if_gguf(patch, interrupt_tokenizer_save=False)
        out = convert_gguf(tmp_path / "model.gguf", tmp_path / "converted")
    assert "quantization_config" not in AutoConfig.from_pretrained(out).to_dict()
    reloaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    original = AutoModelForCausalLM.from_pretrained(models.tiny_model_dir()).state_dict()
    assert reloaded.keys() == original.keys()
    assert all(torch.equal(reloaded[k], original[k]) for k in original)


@pytest.mark.e2e
def test_importing_elora_fed_silences_the_import_noise_it_cannot_act_on():
    """bitsandbytes' hub-kernel notice and torch's script_method warning: gone, other warnings kept."""
    import subprocess
    import sys

    code = "import {}bitsandbytes, warnings; warnings.warn('a real one', DeprecationWarning)"
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def stderr(prefix: str) -> str:
        result = subprocess.run(
            [sys.executable, "-W", "default", "-c", code.format(prefix)], capture_output=True, text=True, env=env
        )
        assert result.returncode == 0, result.stderr
        return result.stderr

    assert "script_method" in stderr("")  # the warning the filter exists for
    quiet = stderr("elora_fed, ")
    assert "script_method" not in quiet and "kernels-community" not in quiet
    assert "a real one" in quiet
