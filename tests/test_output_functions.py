"""Output functions are registered recipe parts: the built-in three are the registry's entries, a config is validated
against the registry, and registering one more function is all it takes to build and query an index with it."""

import pytest
import torch

import dmin_diffusers as dm
from dmin_diffusers import output_functions
from dmin_diffusers.card import describe_recipe
from dmin_diffusers.config import OUTPUT_FUNCTIONS
from dmin_diffusers.families import detect_family
from dmin_diffusers.gradients import GradientSketcher
from dmin_diffusers.output_functions import output_function_named, register_output_function
from dmin_diffusers.resolution import resolve_config
from tiny_models import make_image_dataset, tiny_pipeline


@pytest.fixture
def registry(monkeypatch):
    """A copy of the registry for the test, so a function registered in it is gone afterwards."""
    monkeypatch.setattr(output_functions, "_REGISTRY", dict(output_functions._REGISTRY))


def test_the_built_in_output_functions_are_registered_in_order():
    assert tuple(OUTPUT_FUNCTIONS) == ("loss", "squared_norm", "mean")
    assert OUTPUT_FUNCTIONS == ("loss", "squared_norm", "mean") and "mean" in OUTPUT_FUNCTIONS
    prediction = torch.randn(3, 2, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    target = torch.randn(3, 2, 4, 5, 5, generator=torch.Generator().manual_seed(1))
    expected = {
        "loss": (prediction - target).square().flatten(1).mean(dim=1),
        "squared_norm": prediction.square().flatten(1).sum(dim=1) / 2,  # summed, averaged over the 2 draws
        "mean": prediction.flatten(1).mean(dim=1),
    }
    for name, value in expected.items():
        torch.testing.assert_close(output_function_named(name).function(prediction, target), value, rtol=0, atol=0)


def test_a_config_is_checked_against_the_registry(registry):
    with pytest.raises(ValueError, match="output_function must be one of"):
        dm.DMinConfig(output_function="l1")
    with pytest.raises(ValueError, match="already registered"):
        register_output_function("loss")(lambda prediction, target: prediction.sum())
    with pytest.raises(ValueError, match="non-empty name"):
        register_output_function("")


def test_one_registration_is_all_a_new_output_function_takes(registry, tmp_path):
    @dm.register_output_function("l1", "the mean absolute error against the training target ({objective})")
    def l1(prediction, target):
        return (prediction - target).abs().flatten(1).mean(dim=1)

    assert "l1" in OUTPUT_FUNCTIONS and dm.DMinConfig(output_function="l1").output_function == "l1"
    pipe = tiny_pipeline("ddpm", pipeline_class=dm.DMinDDPMPipeline)
    dataset = make_image_dataset(6)
    config = dm.DMinConfig(num_timesteps=3, projection_dim=1024, output_function="l1")
    index = pipe.build_attribution_index(dataset, tmp_path / "index", config=config, progress=False)
    assert index.config.output_function == "l1"
    assert "The gradient of the mean absolute error against the training target (epsilon)" in describe_recipe(
        index.config)
    for row in range(len(dataset)):
        assert pipe.attribute(dataset[row]["image"], top_k=2, exact=True).indices[0] == row
    assert dm.AttributionIndex.from_pretrained(tmp_path / "index").config.output_function == "l1"  # round trip
    family = detect_family(pipe)
    loss = GradientSketcher(family, resolve_config(config.replace(output_function="loss"), family))
    l1_vector = pipe.attribution_vector(dataset[0]["image"])
    assert not torch.allclose(l1_vector, loss.sketch(loss.prepare(dataset[0]["image"], None)), atol=1e-3)
