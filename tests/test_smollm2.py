"""The embedded SmolLM2-135M-Instruct, converted from its GGUF and scored on real Shakespeare."""

import numpy as np
import pytest
from transformers import AutoConfig

from elora_fed.data.config import DataConfig
from elora_fed.data.federated_data import load_lm_clients
from elora_fed.model.config import ModelConfig
from elora_fed.model.evaluation import mean_token_loss
from elora_fed.model.models import EMBEDDED_MODEL, embedded_model_dir, load_base_model, load_tokenizer


@pytest.fixture(scope="module")
def shakespeare_validation(tokenizer) -> np.ndarray:
    data = load_lm_clients(DataConfig(seq_len=64, num_clients=8, max_samples_per_client=30), tokenizer)
    return np.concatenate([c.splits["validation"] for c in data.clients])


def test_embedded_model_is_cached_as_a_plain_safetensors_directory():
    folder = embedded_model_dir()
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    config = AutoConfig.from_pretrained(folder)
    assert "quantization_config" not in config.to_dict()
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert len(load_tokenizer(ModelConfig(name=EMBEDDED_MODEL))) == config.vocab_size == 49152


@pytest.mark.slow
def test_smollm2_predicts_shakespeare_far_better_than_a_random_model(shakespeare_validation):
    tiny = mean_token_loss(load_base_model(ModelConfig(name="tiny-random")), shakespeare_validation)
    fp32 = mean_token_loss(load_base_model(ModelConfig(name=EMBEDDED_MODEL)), shakespeare_validation)
    nf4 = mean_token_loss(load_base_model(ModelConfig(name=EMBEDDED_MODEL, precision="nf4")), shakespeare_validation)
    print(f"validation loss (nats/token): tiny random {tiny:.3f}, SmolLM2 fp32 {fp32:.3f}, SmolLM2 nf4 {nf4:.3f}")
    assert tiny > 10.0  # about log(49152): a random model knows nothing
    assert fp32 < 0.6 * tiny and nf4 < 0.6 * tiny
    assert abs(nf4 - fp32) < 0.5  # 4-bit costs a little, not the model
