"""The preconditioning default comes from the family, is recorded when an index is built, and degenerate rows
(a one-row index under a centred geometry) score 0 with a warning instead of failing."""

import logging

import numpy as np
import pytest

import dmin_diffusers as dm
from dmin_diffusers.families import family_named
from tiny_models import make_caption_dataset, make_image_dataset, tiny_pipeline

ROWS = 6


def build(kind, tmp_path, rows=ROWS, **config):
    if kind == "ddpm":
        pipe, dataset = tiny_pipeline("ddpm", pipeline_class=dm.DMinDDPMPipeline), make_image_dataset(rows)
    else:
        pipe = tiny_pipeline("stable-diffusion", pipeline_class=dm.DMinStableDiffusionPipeline, lora_rank=4)
        dataset = make_caption_dataset(rows)
    config = dm.DMinConfig(num_timesteps=3, projection_dim=256, **config)
    index = pipe.build_attribution_index(dataset, tmp_path / "index", config=config, progress=False)
    return pipe, dataset, index


def test_an_unset_preconditioning_is_the_family_default():
    assert dm.DMinConfig().preconditioning is None
    assert family_named("ddpm").default_preconditioning == "none"
    for name in ("stable-diffusion", "sdxl", "sd3", "flux"):
        assert family_named(name).default_preconditioning == "centered", name
    assert dm.DMinConfig.paper().preconditioning == "none"


@pytest.mark.parametrize("kind, expected", [("ddpm", "none"), ("stable-diffusion", "centered")])
def test_the_build_records_the_family_default_and_scores_with_it(kind, expected, tmp_path):
    pipe, dataset, index = build(kind, tmp_path)
    assert index.config.preconditioning == expected
    assert dm.DMinConfig.from_json_file(tmp_path / "index" / "dmin_config.json").preconditioning == expected
    assert ("preconditioner.safetensors" in index.files()) == (expected != "none")
    prompt = None if kind == "ddpm" else dataset[0]["text"]
    result = pipe.attribute(dataset[0]["image"], prompt, top_k=ROWS, exact=True)
    assert result.indices[0] == 0
    if expected == "centered":  # a sum over T timesteps of cosines
        assert max(abs(score) for score in result.scores) <= 3 + 1e-4
    # loading the index again into the same pipeline keeps its recorded choice
    pipe.load_attribution_index(tmp_path / "index")
    assert pipe.attribution_index.config.preconditioning == expected


def test_an_explicit_choice_overrides_the_family_default(tmp_path):
    _, _, index = build("stable-diffusion", tmp_path, preconditioning="none")
    assert index.config.preconditioning == "none"
    assert "preconditioner.safetensors" not in index.files()


def test_a_one_row_index_under_the_centred_default_scores_zero_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="dmin_diffusers.preconditioner"):
        pipe, dataset, index = build("stable-diffusion", tmp_path, rows=1)
    assert index.config.preconditioning == "centered"
    assert any("equal the rows' mean" in record.getMessage() for record in caplog.records)
    for exact in (True, False):  # the row has no direction of its own: it scores 0 (not NaN) for any query
        result = pipe.attribute(dataset[0]["image"], dataset[0]["text"], top_k=1, exact=exact)
        assert result.indices == [0]
        np.testing.assert_allclose(result.scores, [0.0], atol=1e-6)


def test_a_query_at_the_rows_mean_scores_zero_with_a_warning(caplog):
    import torch

    from dmin_diffusers.preconditioner import Preconditioner

    rows = torch.randn(5, 2, 16)
    fitted = Preconditioner.fit(rows, "centered")
    query = torch.stack([fitted.mean[0].float(), rows[1, 1]])  # at the stored mean at timestep 0 only
    with caplog.at_level(logging.WARNING, logger="dmin_diffusers.preconditioner"):
        per_timestep = fitted.timestep_scores(query, rows)
    assert torch.isfinite(per_timestep).all()
    np.testing.assert_allclose(per_timestep[:, 0].numpy(), 0.0, atol=1e-5)
    assert per_timestep[1, 1] == per_timestep[:, 1].max()  # the other timestep still ranks
    assert any("query equals the rows' mean at 1 timestep" in record.getMessage() for record in caplog.records)
