"""Each DMinConfig setting is declared once: validation, the `dmin cache` flags, a training script's
`args.dmin_<field>`, the docstring and old-format upgrades all come from its declaration."""

import argparse
import dataclasses

import pytest

import dmin_diffusers as dm
from dmin_diffusers.cli import build_parser
from dmin_diffusers.config import FORMAT_VERSION, PAPER_RECIPE, arguments_doc, setting, settings
from dmin_diffusers.setting_arguments import add_setting_arguments, chosen_settings
from callbacks import GradientCacheCallback

# one value per setting that differs from its default and is valid on its own
SAMPLE_VALUES = {
    "num_timesteps": 3, "projection_dim": 512, "seed": 7, "timesteps": None, "output_function": "loss",
    "timestep_spacing": "cubic", "noise": "per_timestep", "noise_draws": 2, "tracked_parameters": ["*lora*"],
    "resolution": 64, "image_interpolation_mode": "lanczos", "max_sequence_length": 128, "guidance_scale": 2.5,
    "storage_dtype": "float32", "knn_dim": 32, "knn_projection": "fold", "preconditioning": "kernel",
    "preconditioning_damping": 0.1, "hnsw_m": 16, "hnsw_ef_construction": 100, "shard_size": 8,
    "base_model": "user/base", "center_crop": False, "adapter": "user/lora",
}


def dummy_config_class():
    """DMinConfig with one more recipe option, declared the one way every setting is."""
    option = setting("a", "a dummy recipe option.", choices=("a", "b"), paper="b", since=FORMAT_VERSION)
    return dataclasses.make_dataclass("DummyConfig", [("dummy_option", str, option)], bases=(dm.DMinConfig,))


def test_a_new_option_is_one_declaration():
    config_class = dummy_config_class()
    # validated
    assert config_class(dummy_option="b").dummy_option == "b"
    with pytest.raises(ValueError, match=r"dummy_option must be one of \('a', 'b'\), got 'c'"):
        config_class(dummy_option="c")
    # a flag of its own, and read back from it
    parser = argparse.ArgumentParser()
    add_setting_arguments(parser, config_class=config_class)
    parsed = parser.parse_args(["--dummy_option", "b", "--num_timesteps", "4"])
    assert chosen_settings(parsed, config_class) == {"dummy_option": "b", "num_timesteps": 4}
    with pytest.raises(SystemExit):
        parser.parse_args(["--dummy_option", "c"])
    # a training script's args.dmin_<field>
    script_args = argparse.Namespace(dmin_dummy_option="b", resolution=64, seed=3)
    assert chosen_settings(script_args, config_class) == {"dummy_option": "b", "resolution": 64}
    # documented, in the paper's recipe, and an older index loads with its legacy value
    assert "        dummy_option: a dummy recipe option." in arguments_doc(config_class)
    assert config_class.paper().dummy_option == "b"
    assert config_class.from_dict({"format_version": FORMAT_VERSION - 1}).dummy_option == "b"
    assert config_class.from_dict({"format_version": FORMAT_VERSION}).dummy_option == "a"


def test_every_setting_with_a_flag_round_trips_through_dmin_cache():
    arguments = ["cache", "--output_dir", "run"]
    expected = {}
    for name, declared in settings().items():
        value = SAMPLE_VALUES[name]
        if declared.flag == "" or value is None:
            continue
        flag = declared.flag or f"--{declared.script_argument or name}"
        arguments += [flag, *(map(str, value) if isinstance(value, list) else [str(value)])]
        expected[name] = value
    parsed = build_parser().parse_args(arguments)
    assert chosen_settings(parsed) == expected
    assert "seed" in expected and parsed.seed is None  # --dmin_seed, not the training scripts' --seed
    dm.DMinConfig(**expected)  # every sample is valid


def test_the_callback_reads_the_training_scripts_arguments_and_dmin_fields():
    args = argparse.Namespace(output_dir="run", resolution=64, image_interpolation_mode="lanczos", seed=5,
                              pretrained_model_name_or_path="user/base", dmin_num_timesteps=3,
                              dmin_preconditioning="kernel", dmin_seed=9, dmin_knn_dim=32, guidance_scale=None)
    config = GradientCacheCallback.from_training_args(args).config
    assert (config.resolution, config.image_interpolation_mode, config.base_model) == (64, "lanczos", "user/base")
    assert (config.num_timesteps, config.preconditioning, config.seed, config.knn_dim) == (3, "kernel", 9, 32)


def test_the_paper_recipe_and_the_docstring_come_from_the_declarations():
    assert PAPER_RECIPE == {"output_function": "loss", "timestep_spacing": "centres", "noise": "shared",
                            "noise_draws": 1, "preconditioning": "none"}
    for name, declared in settings().items():
        assert f"        {name}: " in dm.DMinConfig.__doc__, name
        assert declared.help.endswith("."), name
    assert set(SAMPLE_VALUES) == set(settings())
