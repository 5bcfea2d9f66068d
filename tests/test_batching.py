"""Per-sample gradients of several (row, timestep) samples in one batched backward: per layer (issue 20) or with
torch.func (issue 11), both equal to the one-at-a-time path."""

import logging

import pytest
import torch

import dmin_diffusers as dm
from dmin_diffusers.families import detect_family
from dmin_diffusers.gradients import GradientSketcher
from dmin_diffusers.resolution import resolve_config
from tiny_models import make_caption_dataset, make_image_dataset, tiny_pipeline

NUM_ROWS = 3
MODELS = [  # (family, LoRA rank or None for full tracking)
    ("ddpm", 4), ("ddpm", None),
    ("stable-diffusion", 4), ("stable-diffusion", None),
    ("sdxl", 4), ("sdxl", None),
    ("sd3", 4), ("sd3", None),
    ("flux", 4), ("flux", None),
]


def sketcher_and_examples(kind, lora_rank, batch_bytes=1 << 30, per_sample="auto", **fields):
    pipe = tiny_pipeline(kind, lora_rank=lora_rank)
    family = detect_family(pipe)
    if kind == "flux":
        fields.setdefault("resolution", 32)  # the tiny Flux generates 32x32; its native size is 128
    config = resolve_config(dm.DMinConfig(num_timesteps=3, projection_dim=512, **fields), family)
    sketcher = GradientSketcher(family, config, batch_bytes=batch_bytes, per_sample=per_sample)
    if family.takes_prompt:
        rows = make_caption_dataset(NUM_ROWS)
        examples = [sketcher.prepare(row["image"], row["text"]) for row in rows]
    else:
        examples = [sketcher.prepare(row["image"], None) for row in make_image_dataset(NUM_ROWS)]
    return sketcher, examples


@pytest.mark.parametrize("per_sample", ["auto", "vmap"])
@pytest.mark.parametrize("kind,lora_rank", MODELS, ids=[f"{k}-{'lora' if r else 'full'}" for k, r in MODELS])
def test_batched_vectors_equal_the_one_at_a_time_path(kind, lora_rank, per_sample, caplog):
    sketcher, examples = sketcher_and_examples(kind, lora_rank, per_sample=per_sample)
    with caplog.at_level(logging.WARNING, logger="dmin_diffusers.gradients"):
        batched = sketcher.sketch_many(examples)
    assert sketcher._batch_samples > 1, "the tiny model should batch"
    assert (sketcher._recorder is not None) == (per_sample == "auto") and not caplog.text  # every family per layer
    sequential = torch.stack([sketcher.sketch_sequential(example) for example in examples])
    assert batched.shape == (NUM_ROWS, 3, 512)
    torch.testing.assert_close(batched, sequential, rtol=1e-4, atol=1e-5)
    assert not torch.equal(batched[0], batched[1])


@pytest.mark.parametrize("fields", [{"output_function": "loss", "noise_draws": 2}, {"noise": "per_timestep"}])
def test_batching_keeps_every_recipe(fields):
    sketcher, examples = sketcher_and_examples("stable-diffusion", 4, **fields)
    sequential = torch.stack([sketcher.sketch_sequential(example) for example in examples])
    torch.testing.assert_close(sketcher.sketch_many(examples), sequential, rtol=1e-4, atol=1e-5)


def test_the_memory_budget_sets_the_batch_size():
    sketcher, examples = sketcher_and_examples("stable-diffusion", 4, batch_bytes=1 << 30)
    sketcher.sketch_many(examples[:1])
    roomy = sketcher._batch_samples
    small, _ = sketcher_and_examples("stable-diffusion", 4, batch_bytes=1 << 20)
    small.sketch_many(examples[:1])
    assert roomy > small._batch_samples >= 1
    none, _ = sketcher_and_examples("stable-diffusion", 4, batch_bytes=0)
    assert none._batch_samples == 1  # 0: the one-at-a-time path
    torch.testing.assert_close(none.sketch_many(examples), sketcher.sketch_many(examples), rtol=1e-4, atol=1e-5)


def test_same_size_batches_make_vectors_independent_of_grouping():
    sketcher, examples = sketcher_and_examples("stable-diffusion", 4)
    together = sketcher.sketch_many(examples, same_size_batches=True)
    alone = sketcher.sketch_many(examples[2:], same_size_batches=True)
    assert torch.equal(together[2], alone[0])


def test_a_layer_used_outside_its_forward_leaves_the_per_layer_path_for_vmap(caplog, monkeypatch):
    sketcher, examples = sketcher_and_examples("ddpm", None)
    predict, denoiser = sketcher.family.predict, sketcher.family.denoiser

    def reads_a_weight(noisy, timestep, conditioning):  # the weight's use here is no call of its layer
        return predict(noisy, timestep, conditioning) + noisy * denoiser.conv_out.weight.sum()

    monkeypatch.setattr(sketcher._prediction, "_predict", reads_a_weight)
    expected = torch.stack([sketcher.sketch_sequential(example) for example in examples])
    with caplog.at_level(logging.WARNING, logger="dmin_diffusers.gradients"):
        vectors = sketcher.sketch_many(examples)
    assert "could not be formed per layer" in caplog.text and "cosine" in caplog.text
    assert sketcher._recorder is None and sketcher._batch_samples > 1
    torch.testing.assert_close(vectors, expected, rtol=1e-4, atol=1e-5)


def test_per_layer_refuses_a_parameter_it_does_not_cover():
    pipe = tiny_pipeline("ddpm")
    family = detect_family(pipe)
    config = resolve_config(dm.DMinConfig(num_timesteps=2, projection_dim=64), family)
    with pytest.raises(ValueError, match="per_sample='per-layer'"):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("dmin_diffusers.gradients.plan_layers", lambda denoiser, names: None)
            GradientSketcher(family, config, per_sample="per-layer")
    with pytest.raises(ValueError, match="per_sample must be one of"):
        GradientSketcher(family, config, per_sample="fast")


def test_a_model_vmap_cannot_batch_falls_back_to_one_at_a_time(caplog, monkeypatch):
    sketcher, examples = sketcher_and_examples("ddpm", None, per_sample="vmap")
    expected = torch.stack([sketcher.sketch_sequential(example) for example in examples])
    predict = sketcher.family.predict

    def data_dependent(noisy, timestep, conditioning):  # .item() has no batching rule
        return predict(noisy, timestep, conditioning) * (1.0 if float(noisy.sum().item()) > -1e9 else 0.0)

    monkeypatch.setattr(sketcher._prediction, "_predict", data_dependent)
    with caplog.at_level(logging.WARNING, logger="dmin_diffusers.gradients"):
        vectors = sketcher.sketch_many(examples)
    assert "could not be batched" in caplog.text
    assert sketcher._batch_samples == 1
    torch.testing.assert_close(vectors, expected, rtol=1e-4, atol=1e-5)
