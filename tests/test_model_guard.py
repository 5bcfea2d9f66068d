"""The model a query runs on is the model the index was built on: checked at every ``attribute`` call, not only at
load. Every way a diffusers user changes a pipeline after attaching an index is refused with an error that names
what changed (or a warning with ``strict=False``), never answered with a stale ranking."""

import copy
import warnings

import pytest
import torch
from peft import get_peft_model_state_dict

import dmin_diffusers as dm
from dmin_diffusers.model_state import ModelMismatchError, adapter_fingerprint
from tiny_models import add_lora, make_caption_dataset, tiny_pipeline

NUM_ROWS = 4


def save_lora(directory, seed):
    trained = tiny_pipeline("stable-diffusion")
    add_lora(trained.unet, rank=4, seed=seed)
    type(trained).save_lora_weights(directory, unet_lora_layers=get_peft_model_state_dict(trained.unet))
    return directory


def with_lora(lora_dir):
    """A fresh base pipeline with the LoRA loaded as a user does (``load_lora_weights``)."""
    pipe = tiny_pipeline("stable-diffusion", dm.DMinStableDiffusionPipeline)
    pipe.load_lora_weights(lora_dir, adapter_name="trained")
    return pipe


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("guard")
    lora, other_lora = save_lora(root / "lora", seed=1), save_lora(root / "other-lora", seed=2)
    dataset = make_caption_dataset(NUM_ROWS)
    config = dm.DMinConfig(num_timesteps=2, projection_dim=256)
    with_lora(lora).build_attribution_index(dataset, root / "index", config=config, progress=False)
    return lora, other_lora, dataset, root / "index"


@pytest.fixture
def attached(built):
    lora, other_lora, dataset, directory = built
    pipe = with_lora(lora)
    pipe.load_attribution_index(directory, dataset=dataset)
    return pipe, dataset, other_lora


def query(pipe, dataset, row=1):
    return pipe.attribute(dataset[row]["image"], dataset[row]["text"], top_k=2)


def test_the_unchanged_pipeline_attributes(attached):
    pipe, dataset, _ = attached
    assert query(pipe, dataset).indices[0] == 1
    assert query(pipe, dataset, row=2).indices[0] == 2  # the state is kept: no re-check, same answers


@pytest.mark.parametrize("change", [
    "load_lora_weights", "set_adapters_scale", "fuse_lora", "disable_lora", "in_place_edit", "data_edit_of_lora",
    "other_vae", "other_text_encoder", "other_unet",
])
def test_a_changed_pipeline_is_refused_at_the_next_query(attached, change):
    pipe, dataset, other_lora = attached
    assert query(pipe, dataset).indices[0] == 1
    expected = {
        "load_lora_weights": "tracked parameters",
        "set_adapters_scale": "adapters",
        "fuse_lora": "adapters",
        "disable_lora": "adapters",
        "in_place_edit": "denoiser",
        "data_edit_of_lora": "tracked parameter values",
        "other_vae": "input models",
        "other_text_encoder": "input models",
        "other_unet": "tracked parameter values",
    }[change]
    if change == "load_lora_weights":
        pipe.load_lora_weights(other_lora, adapter_name="other")
    elif change == "set_adapters_scale":
        pipe.set_adapters(["trained"], adapter_weights=[0.5])
    elif change == "fuse_lora":
        pipe.fuse_lora()
    elif change == "disable_lora":
        pipe.disable_lora()
    elif change == "in_place_edit":
        with torch.no_grad():
            pipe.unet.conv_in.weight.mul_(1.5)
    elif change == "data_edit_of_lora":
        lora_parameter = next(p for name, p in pipe.unet.named_parameters() if "lora_B" in name)
        lora_parameter.data += 0.5  # bypasses autograd's version counter: the sampled values show it
    elif change == "other_vae":
        pipe.vae = tiny_pipeline("stable-diffusion", seed=7).vae
    elif change == "other_text_encoder":
        pipe.text_encoder = tiny_pipeline("stable-diffusion", seed=7).text_encoder
    elif change == "other_unet":
        other = tiny_pipeline("stable-diffusion", seed=0)
        other.load_lora_weights(other_lora, adapter_name="trained")
        pipe.unet = other.unet
    with pytest.raises(ModelMismatchError, match=expected):
        query(pipe, dataset)
    with pytest.raises(ModelMismatchError, match="changed since the attribution index"):
        pipe.attribution_vector(dataset[0]["image"], dataset[0]["text"])  # refused every time, not once


def test_undoing_a_change_attributes_again(attached):
    pipe, dataset, _ = attached
    before = query(pipe, dataset)
    pipe.disable_lora()
    with pytest.raises(ModelMismatchError):
        query(pipe, dataset)
    pipe.enable_lora()
    after = query(pipe, dataset)
    assert after.indices == before.indices
    torch.testing.assert_close(torch.tensor(after.scores), torch.tensor(before.scores))


def test_an_equal_copy_of_a_component_is_accepted(attached):
    pipe, dataset, _ = attached
    before = query(pipe, dataset)
    pipe.vae = copy.deepcopy(pipe.vae)  # another object with the same weights: the full check passes
    assert query(pipe, dataset).indices == before.indices


def test_the_same_lora_loaded_again_rebinds_the_gradients(attached, built):
    pipe, dataset, _ = attached
    lora = built[0]
    before = query(pipe, dataset)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(lora, adapter_name="trained")  # new parameter objects, the same values
    after = query(pipe, dataset)
    assert after.indices == before.indices
    torch.testing.assert_close(torch.tensor(after.scores), torch.tensor(before.scores))


def test_with_strict_false_a_change_warns_and_answers(built):
    lora, _, dataset, directory = built
    pipe = with_lora(lora)
    pipe.load_attribution_index(directory, dataset=dataset, strict=False)
    pipe.set_adapters(["trained"], adapter_weights=[0.5])
    with pytest.warns(UserWarning, match="adapters"):
        query(pipe, dataset)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the change was reported once; the same state is not re-checked
        query(pipe, dataset)


def test_the_adapter_state_is_recorded_and_compared_at_load(built):
    lora, _, dataset, directory = built
    index = dm.AttributionIndex(directory)
    assert index.config.adapter_fingerprint == adapter_fingerprint(with_lora(lora).unet) != "none"
    scaled = with_lora(lora)
    scaled.set_adapters(["trained"], adapter_weights=[0.5])
    with pytest.raises(ModelMismatchError, match="adapters"):
        scaled.load_attribution_index(directory)


def test_an_index_without_the_adapter_fingerprint_still_loads(built, tmp_path):
    """Indices written before the adapter state was recorded (config format 3) are not refused for lacking it."""
    import json
    import shutil

    from dmin_diffusers.store import record_files

    lora, _, dataset, directory = built
    old = tmp_path / "old"
    shutil.copytree(directory, old)
    config = json.loads((old / "dmin_config.json").read_text())
    config.pop("adapter_fingerprint")
    config.pop("image_interpolation_mode")
    config["format_version"] = 3
    (old / "dmin_config.json").write_text(json.dumps(config))
    record_files(old, ["dmin_config.json"])
    pipe = with_lora(lora)
    pipe.load_attribution_index(old, dataset=dataset)
    assert query(pipe, dataset).indices[0] == 1


def test_a_zero_query_vector_is_refused(attached, monkeypatch):
    pipe, dataset, _ = attached
    sketcher = pipe._require_sketcher()
    monkeypatch.setattr(sketcher, "sketch_many", lambda examples, **_: torch.zeros(len(examples), 2, 256))
    with pytest.raises(ValueError, match="is zero at timestep"):
        query(pipe, dataset)
