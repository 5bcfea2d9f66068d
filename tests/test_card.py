"""The dataset card of an index is generated from its config: every setting in the metadata and the table, and
the recipe that was actually used described in words."""

import dataclasses

import pytest
from huggingface_hub import DatasetCard

import dmin_diffusers as dm
from dmin_diffusers.card import RESOLVED_FIELDS, USER_FIELDS, IndexSummary, make_index_card
from dmin_diffusers.config import NOISE_MODES, OUTPUT_FUNCTIONS, TIMESTEP_SPACINGS
from dmin_diffusers.output_functions import output_function_named
from dmin_diffusers.resolution import spread_timesteps
from tiny_models import make_image_dataset, tiny_pipeline

NUM_TRAIN_TIMESTEPS = 1000


def resolved_config(**settings) -> dm.DMinConfig:
    """A config as an index records it (the resolved fields filled in as `resolve_config` fills them)."""
    config = dm.DMinConfig(num_timesteps=4, projection_dim=256, resolution=32, **settings)
    timesteps = config.timesteps or spread_timesteps(4, NUM_TRAIN_TIMESTEPS, config.timestep_spacing)
    return config.replace(
        timesteps=timesteps, family="stable-diffusion", objective="epsilon", num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        parameters=[["unet.x.lora_A.default.weight", [4, 8]]], parameter_fingerprint="f" * 16, denoiser_dtype="float32",
        preconditioning=config.preconditioning or "centered",  # the stable-diffusion family's default
    )


def card_of(config: dm.DMinConfig, knn_dim: int = 64) -> DatasetCard:
    summary = IndexSummary(config, {"num_rows": 5, "name": "user/data"}, {"shards": [], "files": {}}, 5, knn_dim, 1000)
    return DatasetCard(str(make_index_card(summary, "user/index")))  # as loaded back from README.md


def test_the_user_settable_fields_are_every_field_up_to_adapter():
    names = [field.name for field in dataclasses.fields(dm.DMinConfig)]
    assert USER_FIELDS == tuple(names[: names.index("adapter") + 1])
    recipe = {"output_function", "timestep_spacing", "noise", "noise_draws", "image_interpolation_mode"}
    assert recipe <= set(USER_FIELDS)


def test_every_setting_is_in_the_metadata_with_its_value():
    config = resolved_config(
        seed=7, output_function="loss", timestep_spacing="linspace", noise="per_timestep", noise_draws=2,
        tracked_parameters=["*lora*"], center_crop=False, image_interpolation_mode="lanczos", max_sequence_length=64,
        guidance_scale=2.5, storage_dtype="float32", knn_projection="fold", hnsw_m=16, hnsw_ef_construction=100,
        shard_size=8, base_model="user/base", adapter="user/lora",
    )
    card = card_of(config, knn_dim=32)
    metadata = card.data.to_dict()["dmin"]
    for name in USER_FIELDS + RESOLVED_FIELDS:
        expected = 32 if name == "knn_dim" else getattr(config, name)  # the HNSW size as used
        assert metadata[name] == expected, name
        assert f"`{name}`" in card.text or name in ("base_model", "adapter", "family", "parameter_fingerprint"), name
    assert metadata["rows"] == 5
    assert "| `image_interpolation_mode` | `lanczos` |" in card.text and "| `noise_draws` | `2` |" in card.text


@pytest.mark.parametrize("output_function", OUTPUT_FUNCTIONS)
def test_the_card_describes_the_output_function_that_was_used(output_function):
    text = card_of(resolved_config(output_function=output_function)).text
    said = {name: output_function_named(name).description.replace("{objective}", "epsilon")
            for name in OUTPUT_FUNCTIONS}
    assert f"The gradient of {said[output_function]}" in text
    assert not any(phrase in text for name, phrase in said.items() if name != output_function)
    if output_function != "loss":
        assert "training loss" not in text.split("## How it was built")[1].split("## Usage")[0]


def test_the_default_card_says_squared_norm_not_the_training_loss():
    text = card_of(resolved_config()).text
    assert "squared L2 norm of the model's output" in text and "The training loss (epsilon) was" not in text


@pytest.mark.parametrize("spacing", TIMESTEP_SPACINGS)
@pytest.mark.parametrize("noise", NOISE_MODES)
def test_the_card_describes_the_timesteps_and_the_noise(spacing, noise):
    config = resolved_config(timestep_spacing=spacing, noise=noise)
    text = card_of(config).text
    recipe = text.split("## How it was built")[1]
    assert ", ".join(map(str, config.timesteps)) in recipe
    assert {"centres": "centres of T equal slices", "linspace": "evenly spaced", "cubic": "packed at high noise"}[
        spacing] in recipe
    assert {"shared": "the same for every timestep and row", "per_timestep": "of its own for each timestep"}[
        noise] in recipe
    assert "bilinear" in recipe and "center-cropped to 32 pixels" in recipe


def test_explicit_timesteps_and_several_noise_draws_are_said():
    recipe = card_of(resolved_config(timesteps=[1, 2, 3, 999], noise_draws=3)).text.split("## How it was built")[1]
    assert "explicitly chosen timesteps" in recipe and "1, 2, 3, 999" in recipe
    assert "averaged over 3 noise draws per timestep" in recipe


def test_the_card_of_a_built_index(tmp_path):
    pipe = tiny_pipeline("ddpm", pipeline_class=dm.DMinDDPMPipeline)
    index = pipe.build_attribution_index(make_image_dataset(3), tmp_path / "index", config=dm.DMinConfig(
        num_timesteps=2, projection_dim=256), progress=False)
    card = card_of(index.config, index.knn_dim)
    metadata = card.data.to_dict()["dmin"]
    assert metadata["family"] == "ddpm" and metadata["output_function"] == "squared_norm"
    assert metadata["timesteps"] == index.config.timesteps and metadata["knn_dim"] == index.knn_dim
