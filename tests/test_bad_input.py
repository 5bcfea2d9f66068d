"""Bad inputs fail early with an exception naming the problem, never a silent wrong answer or a deep traceback."""

import re

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

import dmin_diffusers as dm
from dmin_diffusers.caching import cache_dataset
from dmin_diffusers.callbacks import GradientCacheCallback
from dmin_diffusers.cli import main as dmin_main
from dmin_diffusers.families import detect_family
from dmin_diffusers.gradients import GradientSketcher
from dmin_diffusers.inputs import preprocess_image, to_pil
from dmin_diffusers.resolution import resolve_config
from tiny_models import make_caption_dataset, tiny_pipeline
from dmin_diffusers.training_data import load_training_dataset

NUM_ROWS = 4


def small_config(**kwargs) -> dm.DMinConfig:
    return dm.DMinConfig(num_timesteps=2, projection_dim=256, **kwargs)


def sd_pipeline():
    return tiny_pipeline("stable-diffusion", pipeline_class=dm.DMinStableDiffusionPipeline, lora_rank=4)


@pytest.fixture(scope="module")
def sd_built(tmp_path_factory):
    pipe, dataset = sd_pipeline(), make_caption_dataset(NUM_ROWS)
    pipe.build_attribution_index(dataset, tmp_path_factory.mktemp("bad") / "index", config=small_config(),
                                 progress=False)
    return pipe, dataset


@pytest.fixture
def no_model_calls(sd_built, monkeypatch):
    """The SD pipeline with its VAE and UNet replaced by functions that fail: an error raised with it in place
    was raised before any model call."""
    pipe, dataset = sd_built

    def boom(*args, **kwargs):
        raise AssertionError("a model was called")

    monkeypatch.setattr(pipe.vae, "encode", boom)
    monkeypatch.setattr(pipe.unet, "forward", boom)
    with pytest.raises(AssertionError, match="a model was called"):  # the patch is in the path
        pipe.attribute(dataset[0]["image"], dataset[0]["text"])
    return pipe, dataset


# ------------------------------------------------------------------------------------------------- images


def test_sixteen_bit_images_are_scaled_not_clipped():
    values = np.random.default_rng(0).integers(0, 65536, (12, 10), dtype=np.uint16)
    values[0, :3] = (0, 257 * 100, 65535)
    expected = np.round(values.astype(np.float64) / 257).astype(np.uint8)
    pil_16 = PIL.Image.fromarray(values)
    pil_32 = PIL.Image.fromarray(values.astype(np.int32))
    assert (pil_16.mode, pil_32.mode) == ("I;16", "I")
    as_torch = torch.from_numpy(values.astype(np.int32)).to(torch.uint16)[None]
    for image in (pil_16, pil_32, values, values[..., None], as_torch):
        converted = np.asarray(to_pil(image))
        np.testing.assert_array_equal(converted, expected)
    assert tuple(np.asarray(to_pil(values))[0, :3]) == (0, 100, 255)
    colour = np.stack([values, 65535 - values, values // 2], axis=-1)
    expected_colour = np.round(colour.astype(np.float64) / 257).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(to_pil(colour)), expected_colour)
    torch.testing.assert_close(preprocess_image(colour, 8), preprocess_image(expected_colour, 8))
    with pytest.raises(ValueError, match=r"16-bit image must hold values in \[0, 65535\]"):
        to_pil(PIL.Image.fromarray(np.full((4, 4), 70000, dtype=np.int32)))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_images_are_refused(value, no_model_calls):
    pipe, dataset = no_model_calls
    image = np.random.default_rng(0).random((32, 32, 3)).astype(np.float32)
    image[3, 4, 1] = value
    for bad in (np.full((32, 32, 3), value, dtype=np.float32), image, torch.from_numpy(image).permute(2, 0, 1)):
        with pytest.raises(ValueError, match="the image contains NaN or infinite values"):
            pipe.attribute(bad, dataset[0]["text"])


@pytest.mark.parametrize(
    "image, size",
    [
        (PIL.Image.new("RGB", (0, 0)), "0x0"),
        (PIL.Image.new("RGB", (0, 16)), "0x16"),
        (np.zeros((0, 0, 3), dtype=np.uint8), "0x0"),
        (np.zeros((32, 0, 3), dtype=np.float32), "0x32"),
        (torch.zeros(3, 16, 0), "0x16"),
    ],
)
def test_empty_images_are_refused_before_any_model_call(image, size, no_model_calls):
    pipe, dataset = no_model_calls
    with pytest.raises(ValueError, match=f"the image is empty: it is {size} pixels"):
        pipe.attribute(image, dataset[0]["text"])


@pytest.mark.parametrize("shape", [(1, 32, 32, 3), (32, 32, 3), (32, 32, 4), (1, 16, 24, 1)])
def test_channels_last_torch_images_are_refused(shape, no_model_calls):
    pipe, dataset = no_model_calls
    with pytest.raises(ValueError, match=r"torch images are channels-first, \(C, H, W\).*looks channels-last"):
        pipe.attribute(torch.rand(shape), dataset[0]["text"])
    with pytest.raises(ValueError, match="torch images are channels-first"):
        to_pil(torch.rand(5, 8, 8))
    with pytest.raises(ValueError, match=r"numpy images are channels-last.*transpose\(1, 2, 0\)"):
        to_pil(np.zeros((3, 16, 16), dtype=np.float32))


# -------------------------------------------------------------------------------------------------- top_k


def test_top_k_accepts_any_integer_but_not_bools_or_floats(sd_built):
    pipe, dataset = sd_built
    image, prompt = dataset[1]["image"], dataset[1]["text"]
    for top_k in (np.int64(3), np.int32(3), torch.tensor(3)):
        result = pipe.attribute(image, prompt, top_k=top_k, exact=True)
        assert len(result.indices) == 3 and result.indices[0] == 1
    for top_k in (True, False, np.bool_(True)):
        with pytest.raises(TypeError, match="top_k must be an integer, got the bool"):
            pipe.attribute(image, prompt, top_k=top_k)
    for top_k in (2.0, 2.5, "3", None):
        with pytest.raises(TypeError, match="top_k must be an integer, got"):
            pipe.attribute(image, prompt, top_k=top_k)
    for top_k in (0, -1, np.int64(0)):
        with pytest.raises(ValueError, match="top_k must be an integer at least 1"):
            pipe.attribute(image, prompt, top_k=top_k)
    with pytest.raises(TypeError, match="exact must be True or False"):
        pipe.attribute(image, prompt, exact="no")


# ------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_timesteps": "2"}, "num_timesteps must be an integer, got str"),
        ({"num_timesteps": True}, "num_timesteps must be an integer, got the bool"),
        ({"projection_dim": 256.0}, "projection_dim must be an integer, got float"),
        ({"seed": 2**63}, r"seed must be an integer in \[0, 9223372036854775807\]"),
        ({"seed": -1}, r"seed must be an integer in \[0, "),
        ({"seed": False}, "seed must be an integer, got the bool"),
        ({"resolution": -32}, r"resolution must be an integer in \[1, "),
        ({"resolution": 0}, r"resolution must be an integer in \[1, "),
        ({"resolution": 32.0}, "resolution must be an integer, got float"),
        ({"resolution": "32"}, "resolution must be an integer, got str"),
        ({"num_timesteps": 2, "timesteps": [1.7, 2.9]}, r"timesteps\[0\] must be an integer, got float 1.7"),
        ({"num_timesteps": 2, "timesteps": [5.0, 6.0]}, r"timesteps\[0\] must be an integer, got float 5.0"),
        ({"num_timesteps": 2, "timesteps": [5, -1]}, r"timesteps\[1\] must be an integer at least 0"),
        ({"num_timesteps": 2, "timesteps": "12"}, "timesteps must be a list of integers"),
        ({"shard_size": 0}, r"shard_size must be an integer in \[1, "),
        ({"shard_size": 1.5}, "shard_size must be an integer"),
        ({"center_crop": "no"}, "center_crop must be True or False"),
        ({"center_crop": 0}, "center_crop must be True or False"),
        ({"hnsw_m": 0}, r"hnsw_m must be an integer in \[2, 1024\], got 0"),
        ({"hnsw_m": 1}, r"hnsw_m must be an integer in \[2, 1024\], got 1"),
        ({"hnsw_m": -1}, r"hnsw_m must be an integer in \[2, 1024\], got -1"),
        ({"hnsw_m": 2**40}, r"hnsw_m must be an integer in \[2, 1024\]"),
        ({"hnsw_ef_construction": 0}, r"hnsw_ef_construction must be an integer in \[1, 100000\]"),
        ({"hnsw_ef_construction": -5}, "hnsw_ef_construction must be an integer in"),
        ({"hnsw_ef_construction": 10**9}, "hnsw_ef_construction must be an integer in"),
        ({"knn_dim": 64.0}, "knn_dim must be an integer"),
        ({"max_sequence_length": 0}, r"max_sequence_length must be an integer in \[1, "),
        ({"noise_draws": np.float64(2)}, "noise_draws must be an integer"),
        ({"tracked_parameters": [3]}, "tracked_parameters must be a list of fnmatch patterns"),
        ({"base_model": 3}, "base_model must be a string or None"),
    ],
)
def test_config_fields_of_the_wrong_type_or_range_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dm.DMinConfig(**kwargs)


def test_config_integers_are_stored_as_plain_ints(tmp_path):
    config = dm.DMinConfig(num_timesteps=np.int64(2), projection_dim=np.int32(256), seed=np.uint64(7),
                           timesteps=np.array([10, 20]), center_crop=np.bool_(True), tracked_parameters=("*lora*",))
    assert config.timesteps == [10, 20] and all(type(t) is int for t in config.timesteps)
    assert type(config.num_timesteps) is type(config.projection_dim) is type(config.seed) is int
    assert config.center_crop is True and config.tracked_parameters == ["*lora*"]
    config.to_json_file(tmp_path / "config.json")  # numpy integers would not serialise
    assert dm.DMinConfig.from_json_file(tmp_path / "config.json") == config
    assert dm.DMinConfig(hnsw_m=2, hnsw_ef_construction=1).hnsw_m == 2
    assert dm.DMinConfig(hnsw_m=1024, seed=2**63 - 1).seed == 2**63 - 1


def test_bad_hnsw_settings_are_refused_before_anything_is_written(tmp_path):
    pipe, dataset = sd_pipeline(), make_caption_dataset(NUM_ROWS)
    with pytest.raises(ValueError, match="hnsw_m"):
        pipe.build_attribution_index(dataset, tmp_path / "index", config=small_config(hnsw_m=1), progress=False)
    assert not (tmp_path / "index").exists()


@pytest.mark.parametrize("config", [{"num_timesteps": 2}, "dmin_config.json", 2])
def test_a_config_must_be_a_dmin_config(config, tmp_path):
    pipe, dataset = sd_pipeline(), make_caption_dataset(NUM_ROWS)
    message = r"config must be a DMinConfig \(use DMinConfig\(\*\*values\) or DMinConfig.from_dict\)"
    with pytest.raises(TypeError, match=message):
        pipe.build_attribution_index(dataset, tmp_path / "a", config=config, progress=False)
    with pytest.raises(TypeError, match=message):
        cache_dataset(pipe, dataset, tmp_path / "b", config=config, progress=False)
    with pytest.raises(TypeError, match=message):
        GradientCacheCallback(tmp_path / "c", config=config)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------- captions


def _with_captions(captions, feature=datasets.Value("string")):
    images = make_caption_dataset(len(captions))["image"]
    features = datasets.Features({"image": datasets.Image(), "text": feature})
    return datasets.Dataset.from_dict({"image": images, "text": captions}, features=features)


def test_a_non_string_caption_column_is_refused(tmp_path):
    pipe = sd_pipeline()
    message = r"caption_column 'text' must hold strings \(datasets.Value\('string'\)\).*int64"
    with pytest.raises(TypeError, match=message):
        pipe.build_attribution_index(_with_captions([1, 2, 3], datasets.Value("int64")), tmp_path / "index",
                                     config=small_config(), progress=False)
    numbers = make_caption_dataset(3).add_column("number", [1, 2, 3])
    with pytest.raises(TypeError, match="caption_column 'number' must hold strings"):
        pipe.build_attribution_index(numbers, tmp_path / "index", config=small_config(), caption_column="number",
                                     progress=False)
    assert not (tmp_path / "index").exists()


def test_a_missing_caption_is_refused_with_its_row_before_anything_is_written(tmp_path):
    pipe = sd_pipeline()
    with pytest.raises(ValueError, match=r"row 2 of the dataset has no caption \(None in column 'text', and 1 more"):
        pipe.build_attribution_index(_with_captions(["a red circle", "", None, "a blue square", None]),
                                     tmp_path / "index", config=small_config(), progress=False)
    shuffled = _with_captions(["a", None, "b", "c"]).select([3, 2, 1, 0])  # positions after select count
    with pytest.raises(ValueError, match="row 2 of the dataset has no caption"):
        cache_dataset(pipe, shuffled, tmp_path / "index", small_config(), progress=False)
    assert not (tmp_path / "index").exists()


def test_image_columns_of_paths_or_missing_images_are_refused(tmp_path):
    pipe, dataset = sd_pipeline(), make_caption_dataset(3)
    paths = datasets.Dataset.from_dict({"image": ["a.png", "b.png"], "text": ["a", "b"]})
    with pytest.raises(TypeError, match=r"image_column 'image' holds strings \(file paths\?\).*datasets.Image\(\)"):
        pipe.build_attribution_index(paths, tmp_path / "index", config=small_config(), progress=False)
    holes = datasets.Dataset.from_dict(
        {"image": [dataset[0]["image"], None], "text": ["a", "b"]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
    )
    with pytest.raises(ValueError, match=r"row 1 of the dataset has no image \(None in column 'image'\)"):
        pipe.build_attribution_index(holes, tmp_path / "index", config=small_config(), progress=False)
    assert not (tmp_path / "index").exists()


# ------------------------------------------------------------------------------------ dataset containers


def test_dataset_dicts_dataloaders_and_streams_are_refused(tmp_path):
    pipe, dataset = sd_pipeline(), make_caption_dataset(NUM_ROWS)
    callback = GradientCacheCallback(tmp_path / "index", config=small_config())
    splits = datasets.DatasetDict({"train": dataset})
    loader = torch.utils.data.DataLoader(dataset, batch_size=2)
    cases = [
        (splits, r"got a DatasetDict of the splits \['train'\]: pass the split, e.g. dataset\['train'\]"),
        (loader, "got a torch DataLoader: pass its dataset, a datasets.Dataset"),
        (dataset.to_iterable_dataset(), "got a streaming IterableDataset: load the dataset without streaming=True"),
    ]
    for bad, message in cases:
        with pytest.raises(TypeError, match=message):
            callback.on_train_end(pipeline=pipe, dataset=bad)
        with pytest.raises(TypeError, match=message):
            pipe.build_attribution_index(bad, tmp_path / "index", config=small_config(), progress=False)
    assert not (tmp_path / "index").exists()


# ---------------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def nothing_loaded(monkeypatch):
    """The CLI's dataset and pipeline loaders replaced by functions that fail: a CLI error raised with them in
    place was raised before anything was loaded."""

    def boom(*args, **kwargs):
        raise AssertionError("something was loaded")

    monkeypatch.setattr("dmin_diffusers.cli.load_pipeline", boom)
    monkeypatch.setattr("dmin_diffusers.training_data.load_training_dataset", boom)


def test_cli_refuses_missing_paths_before_loading_anything(tmp_path, capsys, nothing_loaded):
    data = tmp_path / "data"
    data.mkdir()
    out = str(tmp_path / "out")
    cache = ["cache", "--pretrained_model_name_or_path", str(tmp_path), "--output_dir", out]
    cases = [
        (cache + ["--lora_weights", str(tmp_path / "no-lora"), "--train_data_dir", str(data)],
         f"dmin cache: error: --lora_weights '{tmp_path / 'no-lora'}' does not exist"),
        (cache + ["--lora_weights", "no-lora.safetensors", "--train_data_dir", str(data)],
         "--lora_weights 'no-lora.safetensors' does not exist"),
        (cache + ["--train_data_dir", str(tmp_path / "no-data")],
         f"dmin cache: error: --train_data_dir '{tmp_path / 'no-data'}' does not exist"),
        (cache + ["--instance_data_dir", str(tmp_path / "no-data"), "--instance_prompt", "a photo of sks"],
         "--instance_data_dir '.*no-data' does not exist"),
        (["cache", "--pretrained_model_name_or_path", str(tmp_path / "no-model"), "--output_dir", out,
          "--train_data_dir", str(data)], "--pretrained_model_name_or_path '.*no-model' does not exist"),
        (cache + ["--train_data_dir", str(data), "--num_timesteps", "0"],
         r"num_timesteps must be an integer (at least 1|in \[1, )"),
        (["attribute", "--pretrained_model_name_or_path", str(tmp_path), "--index", out, "--image",
          str(tmp_path / "no.png"), "--lora_weights", str(tmp_path / "no-lora")], "--lora_weights '.*' does not exist"),
        (["attribute", "--pretrained_model_name_or_path", str(tmp_path), "--index", out, "--image",
          str(tmp_path / "no.png")], "dmin attribute: error: --image '.*no.png' does not exist"),
    ]
    for arguments, message in cases:
        assert dmin_main(arguments) == 2, arguments
        error = capsys.readouterr().err
        assert re.search(message, error), (message, error)
    assert not (tmp_path / "out").exists()


def test_a_hub_id_is_not_taken_for_a_missing_path(tmp_path, capsys, nothing_loaded):
    data = tmp_path / "data"
    data.mkdir()
    arguments = ["cache", "--pretrained_model_name_or_path", "user/base-model", "--lora_weights", "user/lora",
                 "--output_dir", str(tmp_path / "out"), "--train_data_dir", str(data)]
    assert dmin_main(arguments) == 2
    # the paths passed: loading was reached (the CLI shows any failure as one line)
    assert capsys.readouterr().err.strip() == "dmin cache: error: AssertionError: something was loaded"


def test_missing_data_directories_are_refused_by_the_dataset_loader(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_data_dir '.*nowhere' does not exist"):
        load_training_dataset(train_data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="instance_data_dir '.*nowhere' does not exist"):
        load_training_dataset(instance_data_dir=str(tmp_path / "nowhere"), instance_prompt="a photo of sks")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="is a file, not a directory"):
        load_training_dataset(train_data_dir=str(tmp_path / "file.png"))


def test_resolution_must_fit_the_vae():
    pipe = tiny_pipeline("stable-diffusion", lora_rank=4)
    with pytest.raises(ValueError, match="resolution 33 is not a multiple of 2"):
        resolve_config(dm.DMinConfig(num_timesteps=2, projection_dim=256, resolution=33), detect_family(pipe))


def test_a_failing_row_is_named(tmp_path, monkeypatch):
    pipe = tiny_pipeline("stable-diffusion", dm.DMinStableDiffusionPipeline, lora_rank=4)
    prepare, calls = GradientSketcher.prepare, []

    def fails_at_row_2(self, image, prompt):
        calls.append(prompt)
        if len(calls) == 3:
            raise RuntimeError("out of memory (simulated)")
        return prepare(self, image, prompt)

    monkeypatch.setattr(GradientSketcher, "prepare", fails_at_row_2)
    config = dm.DMinConfig(num_timesteps=2, projection_dim=256, shard_size=1)
    with pytest.raises(RuntimeError, match="simulated") as caught:
        pipe.build_attribution_index(make_caption_dataset(4), tmp_path / "index", config=config, progress=False)
    if hasattr(caught.value, "__notes__"):  # Python 3.11+
        assert "while caching row 2" in "".join(caught.value.__notes__)
    assert len(list((tmp_path / "index" / "vectors").glob("*.safetensors"))) == 2  # rows 0 and 1 are kept
