"""DMinConfig round trips, image inputs in every format, and each family's training objective."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

import dmin_diffusers as dm
from dmin_diffusers.families import detect_family
from dmin_diffusers.inputs import preprocess_image, to_pil
from dmin_diffusers.objectives import make_objective
from dmin_diffusers.resolution import resolve_config, spread_timesteps
from tiny_models import tiny_pipeline


def test_config_defaults():
    """The paper's sizes, and the recipe measured best by benchmarks/quality.py: its only change to the paper's
    recipe is the output function (D-TRAK's squared output norm instead of the training loss)."""
    config = dm.DMinConfig()
    assert (config.num_timesteps, config.projection_dim, config.storage_dtype) == (10, 4096, "float16")
    assert config.row_dim == 40960
    assert (config.output_function, config.timestep_spacing, config.noise, config.noise_draws) == (
        "squared_norm", "centres", "shared", 1)
    assert dm.DMinConfig.paper().output_function == "loss"


def test_resolved_config_round_trips_through_json(tmp_path):
    pipe = tiny_pipeline("stable-diffusion", lora_rank=4)
    config = resolve_config(dm.DMinConfig(num_timesteps=3, projection_dim=512, seed=7), detect_family(pipe))
    config.to_json_file(tmp_path / "config.json")
    assert dm.DMinConfig.from_json_file(tmp_path / "config.json") == config
    assert config.is_resolved and config.parameter_fingerprint and config.timesteps == [166, 500, 833]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"projection_dim": 1000}, "power of two"),
        ({"num_timesteps": 0}, r"num_timesteps must be an integer in \[1, "),
        ({"num_timesteps": 2, "timesteps": [1, 2, 3]}, "has 3 values"),
        ({"storage_dtype": "int8"}, "storage_dtype"),
        ({"knn_dim": 8192}, "knn_dim"),
        ({"objective": "x0"}, "objective"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dm.DMinConfig(**kwargs)


def test_unknown_config_fields_are_refused():
    with pytest.raises(ValueError, match="unknown DMinConfig fields"):
        dm.DMinConfig.from_dict({"num_timesteps": 2, "future_field": 1})


def test_timesteps_outside_the_schedule_are_refused():
    pipe = tiny_pipeline("ddpm")
    with pytest.raises(ValueError, match=r"outside the training schedule \[0, 1000\)"):
        resolve_config(dm.DMinConfig(num_timesteps=2, timesteps=[5, 1000]), detect_family(pipe))


def test_spread_timesteps_cover_the_schedule():
    assert spread_timesteps(10, 1000) == [50, 150, 250, 350, 450, 550, 650, 750, 850, 950]


def test_every_image_format_gives_the_same_model_input():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    as_float = pixels.astype(np.float32) / 255
    reference = preprocess_image(PIL.Image.fromarray(pixels), 16)
    variants = [
        pixels,
        as_float,
        as_float[None],
        torch.from_numpy(as_float).permute(2, 0, 1),
        torch.from_numpy(as_float).permute(2, 0, 1)[None],
        [PIL.Image.fromarray(pixels)],
    ]
    for variant in variants:
        torch.testing.assert_close(preprocess_image(variant, 16), reference, atol=1 / 127.5, rtol=0)
    assert reference.shape == (1, 3, 16, 16) and reference.min() >= -1 and reference.max() <= 1


def test_resize_and_center_crop_like_the_training_scripts():
    image = PIL.Image.new("RGB", (40, 20), "black")
    image.paste(PIL.Image.new("RGB", (20, 20), "white"), (10, 0))  # white centre square
    tensor = preprocess_image(image, 10)
    assert tensor.shape == (1, 3, 10, 10)
    # resized to 20x10, the 10x10 centre crop is the white square (bilinear blends only its border columns)
    assert tensor[..., 1:-1].min() > 0.99 and tensor.min() > 0.5
    gray = preprocess_image(image, 10, channels=1)
    assert gray.shape == (1, 1, 10, 10)


def test_to_pil_grayscale_and_errors():
    assert to_pil(np.zeros((8, 8, 1), dtype=np.float32)).mode == "L"
    with pytest.raises(ValueError, match="expected one image"):
        to_pil([PIL.Image.new("RGB", (4, 4))] * 2)
    with pytest.raises(TypeError, match="uint8 or float"):
        to_pil(np.zeros((4, 4, 3), dtype=np.int64))


def test_objectives_follow_the_scheduler():
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    alpha = scheduler.alphas_cumprod[300]
    expected_noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise

    epsilon = make_objective(scheduler).noised(latents, noise, 300)
    torch.testing.assert_close(epsilon.noisy, expected_noisy)
    torch.testing.assert_close(epsilon.target, noise)
    assert epsilon.model_timestep.tolist() == [300]

    v_scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    velocity = make_objective(v_scheduler).noised(latents, noise, 300)
    torch.testing.assert_close(velocity.target, alpha.sqrt() * noise - (1 - alpha).sqrt() * latents)
    sample = make_objective(DDPMScheduler(prediction_type="sample")).noised(latents, noise, 300)
    torch.testing.assert_close(sample.target, latents)

    flow_scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    # a flow-matching scheduler's config names no prediction_type: the family's declared objective is used
    assert make_objective(flow_scheduler).name == "epsilon"
    flow = make_objective(flow_scheduler, default="flow_matching")
    assert flow.name == "flow_matching"
    sigmas = flow.sigmas
    assert torch.all(sigmas[1:] > sigmas[:-1])  # the noise level grows with t
    noised = flow.noised(latents, noise, 600)
    sigma = float(sigmas[600])
    torch.testing.assert_close(noised.noisy, (1 - sigma) * latents + sigma * noise)
    torch.testing.assert_close(noised.target, noise - latents)
    torch.testing.assert_close(noised.model_timestep, torch.tensor([sigma * 1000]))


def test_inference_does_not_change_the_training_schedule():
    """Pipelines shrink their scheduler with set_timesteps; the objective must not see that."""
    pipe = tiny_pipeline("sd3")
    family = detect_family(pipe)
    before = family.objective().noised(torch.zeros(1, 4, 2, 2), torch.ones(1, 4, 2, 2), 500).noisy
    pipe("a red circle", num_inference_steps=2, output_type="np")
    after = family.objective().noised(torch.zeros(1, 4, 2, 2), torch.ones(1, 4, 2, 2), 500).noisy
    assert family.objective().name == "flow_matching"
    torch.testing.assert_close(before, after)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_stable_diffusion_records_its_prediction_type(prediction_type):
    pipe = tiny_pipeline("stable-diffusion", lora_rank=4, prediction_type=prediction_type)
    assert resolve_config(dm.DMinConfig(), detect_family(pipe)).objective == prediction_type
