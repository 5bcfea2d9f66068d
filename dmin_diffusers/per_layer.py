"""Per-sample weight gradients of linear, convolution and normalisation layers from one plain batched backward.

A layer's weight gradient for one sample is a contraction of the layer's input with the gradient of its output
over that sample's positions (tokens, pixels and noise draws). :class:`LayerRecorder` keeps, during the forward,
each tracked layer's input and the gradient edge of its output; one ``torch.autograd.grad`` call then gives the
output gradients (and no weight gradient is ever summed over the batch), and :meth:`LayerRecorder.gradients`
contracts them per sample, one parameter at a time. The model runs its own kernels (fused attention included),
which is what ``torch.func.vmap`` cannot offer where an operator has no batching rule.

peft's LoRA adapters are ``nn.Linear`` (or ``nn.Conv2d``) modules themselves, so their ``A`` and ``B`` matrices
are covered by the same rules.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.normalization import RMSNorm


def _channel_sums(t: torch.Tensor, samples: int) -> torch.Tensor:
    """``(samples * draws, C, ...)`` summed per sample and channel: ``(samples, C)``."""
    return t.reshape(samples, -1, t.shape[1], t[0, 0].numel()).sum(dim=(1, 3))


def _linear(module: torch.nn.Linear, x: torch.Tensor, g: torch.Tensor, name: str, samples: int) -> torch.Tensor:
    g = g.reshape(samples, -1, g.shape[-1])
    if name == "bias":
        return g.sum(dim=1)
    return torch.bmm(g.transpose(1, 2), x.reshape(samples, -1, x.shape[-1]))


def _conv2d(module: torch.nn.Conv2d, x: torch.Tensor, g: torch.Tensor, name: str, samples: int) -> torch.Tensor:
    if name == "bias":
        return _channel_sums(g, samples)
    # the samples as groups of one convolution: its weight gradient holds each sample's own
    def grouped(t: torch.Tensor) -> torch.Tensor:  # (samples * draws, C, H, W) -> (draws, samples * C, H, W)
        return t.reshape(samples, -1, *t.shape[1:]).transpose(0, 1).flatten(1, 2)

    out_channels, *rest = module.weight.shape
    weight_shape = (samples * out_channels, *rest)
    _, gradient, _ = torch.ops.aten.convolution_backward(
        grouped(g), grouped(x), module.weight.new_empty(weight_shape), None, module.stride, module.padding,
        module.dilation, False, [0, 0], samples * module.groups, [False, True, False],
    )
    return gradient.reshape(samples, *module.weight.shape)


def _normalised(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's output before its elementwise weight and bias."""
    if isinstance(module, torch.nn.GroupNorm):
        return F.group_norm(x, module.num_groups, eps=module.eps)
    if isinstance(module, torch.nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, eps=module.eps)
    if not isinstance(module, RMSNorm):  # torch's own RMSNorm
        return F.rms_norm(x, module.normalized_shape, eps=module.eps)
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)  # as diffusers' RMSNorm computes it
    normalised = x * torch.rsqrt(variance + module.eps)
    return normalised.to(module.weight.dtype) if module.weight.dtype in (torch.float16, torch.bfloat16) else normalised


def _norm(module: torch.nn.Module, x: torch.Tensor, g: torch.Tensor, name: str, samples: int) -> torch.Tensor:
    if name == "weight":
        g = g * _normalised(module, x)
    if isinstance(module, torch.nn.GroupNorm):  # channels on axis 1
        return _channel_sums(g, samples)
    return g.reshape(samples, -1, *getattr(module, "normalized_shape", g.shape[-1:])).sum(dim=1)


_NORMS = tuple(kind for kind in (torch.nn.GroupNorm, torch.nn.LayerNorm, getattr(torch.nn, "RMSNorm", None), RMSNorm)
               if kind is not None)  # torch.nn.RMSNorm: torch >= 2.4


def _rule(module: torch.nn.Module):
    """The per-sample gradient rule of a layer, or ``None`` where none applies."""
    if type(module) is torch.nn.Linear:
        return _linear
    if type(module) is torch.nn.Conv2d and module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return _conv2d
    if type(module) in _NORMS:
        return _norm
    return None


@dataclass
class _Layer:
    module: torch.nn.Module
    rule: object
    calls: list[tuple[torch.Tensor, object]] = field(default_factory=list)  # (input, output gradient edge)


def plan_layers(denoiser: torch.nn.Module, names: list[str]) -> list[tuple[_Layer, str]] | None:
    """For each tracked parameter name (as in ``denoiser.named_parameters()``), its layer and whether it is the
    layer's ``weight`` or ``bias``; ``None`` when any parameter is not one of a covered layer (or torch is
    older than 2.2, which cannot differentiate with respect to a gradient edge)."""
    if not hasattr(torch.autograd.graph, "get_gradient_edge"):
        return None
    modules = dict(denoiser.named_modules())
    layers: dict[str, _Layer] = {}
    plan = []
    for name in names:
        owner, _, attribute = name.rpartition(".")
        module = modules.get(owner)
        rule = _rule(module) if module is not None and attribute in ("weight", "bias") else None
        if rule is None:
            return None
        layer = layers.setdefault(owner, _Layer(module, rule))
        plan.append((layer, attribute))
    return plan


class LayerRecorder:
    """Records the tracked layers' inputs and output edges during one forward of ``samples * draws`` inputs
    (sample ``b`` owns inputs ``[b * draws, (b + 1) * draws)``), then yields each parameter's ``(samples, ...)``
    per-sample gradients."""

    def __init__(self, plan: list[tuple[_Layer, str]]):
        self.plan = plan
        self.layers = list({id(layer): layer for layer, _ in plan}.values())
        self.batch = 0

    @contextmanager
    def recording(self, batch: int) -> Iterator[None]:
        """Hooks on the tracked layers while the forward of ``batch`` inputs runs."""
        self.batch = batch
        for layer in self.layers:
            layer.calls.clear()
        handles = [layer.module.register_forward_hook(self._keeper(layer)) for layer in self.layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _keeper(self, layer: _Layer):
        def keep(module, args, output):
            if not args or args[0].shape[0] != self.batch or output.shape[0] != self.batch or not output.requires_grad:
                # caught by GradientSketcher, which then takes the vmap path
                raise RuntimeError(f"a {type(module).__name__} ran outside the batch, or without gradients")
            layer.calls.append((args[0].detach(), torch.autograd.graph.get_gradient_edge(output)))

        return keep

    def gradients(self, total: torch.Tensor, samples: int) -> Iterator[torch.Tensor]:
        """Differentiates ``total`` (the sum of the samples' outputs) and yields, in plan order, each tracked
        parameter's per-sample gradients; layers never called give zeros, as autograd would."""
        calls = [(layer, call) for layer in self.layers for call in layer.calls]
        output_grads = torch.autograd.grad(total, [edge for _, (_, edge) in calls], allow_unused=True)
        pairs: dict[int, list] = {}
        for (layer, (inputs, _)), grad in zip(calls, output_grads):
            if grad is not None:
                pairs.setdefault(id(layer), []).append((inputs, grad))
        del calls, output_grads
        for layer, attribute in self.plan:
            calls = pairs.get(id(layer), [])
            parts = (layer.rule(layer.module, inputs, grad, attribute, samples) for inputs, grad in calls)
            gradient = next(parts, None)
            if gradient is None:
                parameter = getattr(layer.module, attribute)
                gradient = torch.zeros(samples, *parameter.shape, dtype=parameter.dtype, device=parameter.device)
            for part in parts:  # a layer called more than once
                gradient += part
            yield gradient
        for layer in self.layers:
            layer.calls.clear()
