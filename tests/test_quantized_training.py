"""4-bit (nf4) training on the real bitsandbytes layers: an inference pass never stops later
training, and a backward pass without signal stops with a named error.

On a CPU with AVX-512 BF16, bitsandbytes repacks a Linear4bit weight for its fused
inference kernel at the first no-grad forward, and that kernel has no autograd formula
(``elora_fed.model.models.keep_4bit_layers_differentiable``). Without the fix, the first test
gets exactly zero LoRA gradients on such a CPU.
"""

import numpy as np
import pytest
import torch
from bitsandbytes.functional import has_avx512bf16
from flwr.app import ConfigRecord, Context, RecordDict

from clients import handlers as client_app
from clients import node as client_node
from clients.protocol import run_record
from clients.records import adapter_from, adapter_record, ensemble_records
from elora_fed.config import RunConfig
from elora_fed.ensemble.outputs import GroupAdapters
from elora_fed.errors import ZeroGradientError
from elora_fed.model.adapters import attach_lora
from elora_fed.model.batches import Batch
from elora_fed.model.config import AdapterConfig, ModelConfig
from elora_fed.model.models import load_base_model
from elora_fed.model.training import target_log_loss, train_adapter
from elora_fed.sketch.gradients import gradient_dim, sketch_batches
from elora_fed.sketch.projection import JLProjector

NF4 = ModelConfig(name="tiny-random", precision="nf4", device="cpu")
ADAPTER = AdapterConfig(rank=4, alpha=8, target_modules="q_proj,v_proj", seed=0)


def lora_b_gradient_norm(model: torch.nn.Module) -> float:
    grads = [p.grad for name, p in model.named_parameters() if "lora_B" in name and p.grad is not None]
    return float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads))) if grads else 0.0


def batches(n: int = 2) -> list[Batch]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (n * 3, 16), generator=generator)
    mask = torch.ones_like(ids)
    return [Batch(ids[i : i + 3], mask[i : i + 3], None, None) for i in range(0, len(ids), 3)]


def test_an_inference_pass_then_training_gives_nonzero_gradients_and_a_falling_loss():
    model = load_base_model(NF4)
    x = torch.randint(0, 1000, (3, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=x)  # the reproduction: any inference pass first
    peft_model = attach_lora(model, ADAPTER)
    peft_model(input_ids=x, labels=x).loss.backward()
    assert lora_b_gradient_norm(peft_model) > 1e-3
    layers = [m for m in peft_model.modules() if type(m).__name__ == "Linear4bit"]
    assert layers and not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    peft_model.zero_grad()
    losses = train_adapter(peft_model, batches(1), steps=20, lr=0.01, objective=target_log_loss)
    assert np.mean(losses[-3:]) < losses[0] - 0.1, losses


def test_the_client_apps_cached_nf4_model_trains_after_it_evaluated():
    config = RunConfig.from_flat(
        {
            "model.name": "tiny-random",
            "model.precision": "nf4",
            "data.num_clients": 2,
            "data.max_samples_per_client": 12,
            "sketch.dim": 16,
        }
    )
    context = Context(
        run_id=1, node_id=10, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(), run_config={}
    )

    def request(**records) -> RecordDict:
        return RecordDict({"run": run_record(config), **records})

    client_node.adapted_model.cache_clear()
    stats = client_app.stats_content(request(options=ConfigRecord({"with-theta-star": True})), context)
    start = stats.array_records["theta-star"].to_torch_state_dict()
    evaluate = ConfigRecord({"split": "validation", "groups": ["0"], "weights": [1.0]})
    before = client_app.evaluate_content(
        request(config=evaluate, **ensemble_records({0: GroupAdapters(start)})), context
    )
    options = ConfigRecord({"local-steps": 6, "lr": 0.05, "batch-size": 4, "seed": "0:train:1", "objective": "fit"})
    reply = client_app.train_content(request(arrays=adapter_record(start), config=options), context)
    update = adapter_from(reply.array_records["arrays"], start)
    moved = [k for k in start if "lora_B" in k and not torch.equal(update[k], start[k])]
    assert moved, "training after an evaluation left every LoRA B matrix at zero"
    after = client_app.evaluate_content(
        request(config=evaluate, **ensemble_records({0: GroupAdapters(update)})), context
    )
    assert after.metric_records["metrics"]["loss"] != before.metric_records["metrics"]["loss"]
    assert client_node.adapted_model.cache_info().misses == 1  # one model, evaluated then trained
    client_node.adapted_model.cache_clear()


def _no_gradient_through_4bit_layers(model: torch.nn.Module, how: str) -> None:
    """Make every Linear4bit pass no gradient, as bitsandbytes' fused CPU kernel does."""
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    if how == "fused-kernel":  # the real mechanism: re-enable the repacking, then one inference pass
        if not has_avx512bf16():
            pytest.skip("bitsandbytes uses its fused 4-bit kernel only on CPUs with AVX-512 BF16")
        for layer in layers:
            layer.support_avx512bf16_for_cpu = True
        with torch.no_grad():
            model(input_ids=batches()[0].input_ids)
    else:  # any CPU: outputs that stay in the graph with an exactly zero gradient
        for layer in layers:
            layer.register_forward_hook(lambda _m, _args, out: out.detach() + 0 * out)


@pytest.mark.parametrize("how", ["fused-kernel", "zero-backward"])
def test_the_guard_stops_training_and_sketching_on_zero_gradients_by_name(how):
    peft_model = attach_lora(load_base_model(NF4), ADAPTER)
    _no_gradient_through_4bit_layers(peft_model, how)
    with pytest.raises(ZeroGradientError, match=r"training step 0: .*tiny-random.* in nf4"):
        train_adapter(peft_model, batches(), steps=3, lr=0.01)
    projector = JLProjector(gradient_dim(peft_model), 8, seed=0)
    with pytest.raises(ZeroGradientError, match=r"sketch batch 0: .*in nf4"):
        sketch_batches(peft_model, batches(), projector)


def test_the_guard_lets_a_finite_loss_with_real_gradients_through():
    peft_model = attach_lora(load_base_model(NF4), ADAPTER)
    losses = train_adapter(peft_model, batches(), steps=2, lr=0.01)
    assert len(losses) == 2 and all(np.isfinite(losses))
