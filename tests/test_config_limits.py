"""A config is bounded before anything is allocated from it: an index's dmin_config.json may come from anywhere."""

import pytest

import dmin_diffusers as dm
from dmin_diffusers.config import FORMAT_VERSION, MAX_ROW_DIM


@pytest.mark.parametrize("values, message", [
    ({"projection_dim": 2**40}, "projection_dim must be an integer in"),
    ({"num_timesteps": 10**9}, "num_timesteps must be an integer in"),
    ({"num_timesteps": 1024, "projection_dim": MAX_ROW_DIM}, "at most"),
    ({"noise_draws": 10**6}, "noise_draws must be an integer in"),
    ({"resolution": 10**7}, "resolution must be an integer in"),
    ({"shard_size": 2**40}, "shard_size must be an integer in"),
    ({"max_sequence_length": 2**31}, "max_sequence_length must be an integer in"),
    ({"num_train_timesteps": 2**40}, "num_train_timesteps must be an integer in"),
])
def test_huge_values_are_refused(values, message):
    with pytest.raises(ValueError, match=message):
        dm.DMinConfig.from_dict(values)


def test_a_config_from_a_newer_version_or_not_an_object_is_refused():
    with pytest.raises(ValueError, match="newer dmin-diffusers"):
        dm.DMinConfig.from_dict({"format_version": FORMAT_VERSION + 1})
    with pytest.raises(ValueError, match="JSON object"):
        dm.DMinConfig.from_dict([["num_timesteps", 2]])


def test_real_settings_stay_allowed():
    config = dm.DMinConfig(num_timesteps=100, projection_dim=2**16, resolution=1024, noise_draws=8)
    assert dm.DMinConfig.from_dict(config.to_dict()) == config


def test_the_interpolation_mode_is_one_of_the_training_scripts():
    assert dm.DMinConfig(image_interpolation_mode="lanczos").image_interpolation_mode == "lanczos"
    with pytest.raises(ValueError, match="image_interpolation_mode must be one of"):
        dm.DMinConfig(image_interpolation_mode="cubic")
