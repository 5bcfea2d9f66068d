"""Per-layer per-sample gradients (dmin_diffusers.per_layer) equal autograd's gradient of each sample alone."""

import pytest
import torch
from diffusers.models.normalization import RMSNorm

from dmin_diffusers.per_layer import LayerRecorder, plan_layers


class Toy(torch.nn.Module):
    """One layer of every covered kind, with strides, padding and dilation, and one layer called twice."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=2, dilation=2)
        self.grouped_conv = torch.nn.Conv2d(8, 8, 1, groups=2)
        self.group_norm = torch.nn.GroupNorm(4, 8)
        self.layer_norm = torch.nn.LayerNorm(8)
        self.rms_norm = RMSNorm(8, eps=1e-6)
        self.torch_rms_norm = torch.nn.RMSNorm(8, eps=1e-6)
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x):
        h = self.group_norm(self.grouped_conv(self.conv(x))).flatten(2).transpose(1, 2)  # (N, tokens, 8)
        h = self.linear(self.layer_norm(h).tanh())
        return self.linear(self.torch_rms_norm(self.rms_norm(h)).tanh())  # self.linear runs twice


def per_sample_autograd(model, inputs, samples):
    """Each sample's gradient alone: its ``draws`` inputs through the model, one backward each."""
    draws = inputs.shape[0] // samples
    result = []
    for b in range(samples):
        model.zero_grad()
        model(inputs[b * draws : (b + 1) * draws]).square().sum().backward()
        result.append({name: p.grad.clone() for name, p in model.named_parameters()})
    return result


@pytest.mark.parametrize("draws", [1, 2])
def test_every_rule_equals_autograd_per_sample(draws):
    torch.manual_seed(0)
    model, samples = Toy(), 3
    for p in model.parameters():  # weights off their initial ones and biases off zero, so no term vanishes
        p.data += 0.3 * torch.randn_like(p)
    inputs = torch.randn(samples * draws, 3, 9, 9)
    expected = per_sample_autograd(model, inputs, samples)
    names = [name for name, _ in model.named_parameters()]
    recorder = LayerRecorder(plan_layers(model, names))
    with recorder.recording(len(inputs)):
        total = model(inputs).square().sum()
    for name, gradient in zip(names, recorder.gradients(total, samples)):
        for b in range(samples):
            torch.testing.assert_close(gradient[b], expected[b][name], rtol=1e-4, atol=1e-5, msg=name)


def test_a_parameter_of_an_uncovered_layer_has_no_plan():
    model = torch.nn.Sequential(torch.nn.Embedding(4, 8), torch.nn.Linear(8, 2))
    assert plan_layers(model, ["1.weight"]) is not None
    assert plan_layers(model, ["0.weight", "1.weight"]) is None
    circular = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"))
    assert plan_layers(circular, ["0.weight"]) is None
