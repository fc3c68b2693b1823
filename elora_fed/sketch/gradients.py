"""Projected per-sample gradients of h at theta*: the only step of the method that runs the model.

For every sample s the engine computes the base output b_s = h(s) and the gradient
g_s = d h(s) / d X of the adapter's trainable parameters X at their initial value theta*,
then projects it: g~_s = P^T g_s (``elora_fed.sketch.projection``).

Per-sample gradients come from one forward and one backward per batch, never one autograd
call per sample:
- LoRA (the fast path): at theta*, B = 0, so the gradient with respect to A is exactly
  zero (h depends on A only through B A x). To first order the adapter acts through B
  alone, so only the B gradients are taken and projected. lora_B is a plain Linear
  (r -> out); its per-sample weight gradient is sum_t grad_out[t] (x) input[t], assembled
  from the input captured by a forward hook and the output gradient captured by a tensor
  hook during the single backward of sum_s h(s). Samples do not interact, so that
  backward gives each sample's own output gradients.
- Any other peft tuner (IA3, ...): ``torch.func.vmap(grad(h))`` over the batch, with every
  trainable parameter (dense bases only: bitsandbytes layers do not support vmap).

Gradients are buffered (``buffer_mb``) and projected together, so the cost of generating
P is shared by many samples while memory stays bounded independently of p x d: the buffer
holds at most ``buffer_mb`` of gradients (n x p) and one block of P (``block_rows`` x d).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from elora_fed.errors import ConfigError
from elora_fed.model.batches import Batch
from elora_fed.model.compute import full_precision
from elora_fed.model.gradient_guard import check_gradients
from elora_fed.model.models import quantized_modules
from elora_fed.sketch.projection import JLProjector


def lora_b_modules(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The lora_B layers of a plain-LoRA model (only LoRA weights trainable, no DoRA); else []."""
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    if not trainable or not all(".lora_A." in n or ".lora_B." in n for n in trainable):
        return []
    found: list[tuple[str, nn.Linear]] = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            if any(module.use_dora.values()):
                return []
            for adapter, linear in module.lora_B.items():
                assert isinstance(linear, nn.Linear)
                found.append((f"{name}.lora_B.{adapter}", linear))
    return found


def gradient_parameters(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The parameters whose gradients are sketched, in the fixed order of the flattened vector.

    Plain LoRA: the B matrices only. Otherwise: every trainable parameter.
    """
    b_layers = lora_b_modules(model)
    if b_layers:
        return [(f"{name}.weight", linear.weight) for name, linear in b_layers]
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def gradient_dim(model: nn.Module) -> int:
    """p: the length of one flattened per-sample gradient."""
    return sum(p.numel() for _, p in gradient_parameters(model))


class _LoraBCapture:
    """Forward and tensor hooks that keep each lora_B layer's input and output gradient.

    An output that no gradient reaches keeps a zero gradient, so a cut autograd path shows
    up as zero features (and the zero-gradient guard), not as a crash.
    """

    def __init__(self, layers: list[tuple[str, nn.Linear]]) -> None:
        self.layers = layers
        self.inputs: dict[str, torch.Tensor] = {}
        self.output_shapes: dict[str, torch.Size] = {}
        self.grads: dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        handles = [linear.register_forward_hook(self._hook(name)) for name, linear in self.layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
        def forward_hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            self.inputs[name] = args[0].detach()
            self.output_shapes[name] = output.shape
            output.register_hook(lambda grad: None if grad is None else self.grads.__setitem__(name, grad.detach()))

        return forward_hook

    @full_precision
    def per_sample(self, n: int) -> torch.Tensor:
        """(n, p): sum over positions of grad_out (x) input, per sample, flattened like the weights."""
        parts = []
        for name, _ in self.layers:
            x = self.inputs[name].float()
            grad = self.grads.get(name)
            grad = torch.zeros(self.output_shapes[name], device=x.device) if grad is None else grad.float()
            parts.append(torch.einsum("bto,bti->boi", grad, x).reshape(n, -1))
        self.inputs.clear()
        self.output_shapes.clear()
        self.grads.clear()
        return torch.cat(parts, dim=1)


def per_sample_gradients(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """h (n,) and the flattened per-sample gradients (n, p) for one batch, batched."""
    layers = lora_b_modules(model)
    if layers:
        return _lora_b_gradients(model, layers, batch)
    return _vmap_gradients(model, batch)


def _lora_b_gradients(
    model: nn.Module, layers: list[tuple[str, nn.Linear]], batch: Batch
) -> tuple[torch.Tensor, torch.Tensor]:
    capture = _LoraBCapture(layers)
    with capture.active():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        h = batch.outputs(logits)
    # Asking for the B weights only: autograd skips A's (zero) weight gradients.
    torch.autograd.grad(h.sum(), [linear.weight for _, linear in layers], allow_unused=True)
    return h.detach(), capture.per_sample(len(batch))


def _vmap_gradients(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    quantized = quantized_modules(model)
    if quantized:
        raise ConfigError(
            f"per-sample gradients for this adapter type need a dense base model (fp32 or bf16): torch.func "
            f"cannot differentiate through bitsandbytes layers such as {quantized[0]}. Use LoRA for 4-bit bases."
        )
    params = {name: p.detach() for name, p in gradient_parameters(model)}
    label_ids = batch.label_token_ids
    labels = batch.labels if batch.labels is not None else torch.zeros(len(batch), dtype=torch.long)

    def h_one(p: dict[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        # No attention mask: with right padding the causal mask alone keeps real tokens from
        # seeing padding, and a padding mask would need data-dependent control flow in vmap.
        one = Batch(ids[None], mask[None], None if batch.labels is None else label[None], label_ids)
        logits = functional_call(model, p, args=(), kwargs={"input_ids": one.input_ids}).logits
        return one.outputs(logits)[0]

    grads, h = vmap(grad_and_value(h_one), in_dims=(None, 0, 0, 0))(
        params, batch.input_ids, batch.attention_mask, labels.to(batch.input_ids.device)
    )
    return h.detach(), torch.cat([grads[name].reshape(len(batch), -1) for name in params], dim=1).float()


def naive_per_sample_gradients(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: one unpadded forward and one autograd call per sample."""
    params = [p for _, p in gradient_parameters(model)]
    outputs, rows = [], []
    for i in range(len(batch)):
        one = batch.select(i)
        h = one.outputs(model(input_ids=one.input_ids, attention_mask=one.attention_mask).logits)[0]
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(h, params)]).float())
        outputs.append(h.detach())
    return torch.stack(outputs), torch.stack(rows)


@dataclass(frozen=True)
class Sketch:
    """Base outputs b (n,) and projected gradients (n, d) of a sequence of samples, in order."""

    outputs: torch.Tensor
    features: torch.Tensor


def sketch_batches(
    model: nn.Module, batches: Iterable[Batch], projector: JLProjector, buffer_mb: float = 1024.0
) -> Sketch:
    """Sketch every sample of ``batches``, in order; gradients are projected a buffer at a time.

    Raises ZeroGradientError for a batch whose per-sample gradients are all exactly zero.
    """
    device = next(model.parameters()).device
    p = gradient_dim(model)
    if p != projector.input_dim:
        raise ValueError(f"the projector expects p = {projector.input_dim}, the adapter has p = {p}")
    capacity = max(1, int(buffer_mb * 2**20 // (4 * p)))  # samples whose gradients fit in the buffer
    pending: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    features: list[torch.Tensor] = []

    def flush() -> None:
        if pending:
            features.append(projector.project(pending).cpu())
            pending.clear()

    for index, batch in enumerate(batches):
        h, grads = per_sample_gradients(model, batch.to(device))
        check_gradients(model, h, [grads], f"sketch batch {index}")
        outputs.append(h.float().cpu())
        if pending and sum(len(g) for g in pending) + len(grads) > capacity:
            flush()
        pending.append(grads)
    flush()
    if not outputs:
        return Sketch(torch.zeros(0), torch.zeros(0, projector.output_dim))
    return Sketch(torch.cat(outputs), torch.cat(features))
