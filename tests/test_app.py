"""The attribution page's functions (`dmin_diffusers.app`), without a browser: what it generates, the gallery,
table, chart and status it shows, Hub links, errors, and the per-timestep scores behind the chart."""

import numpy as np
import PIL.Image
import pytest

import dmin_diffusers as dm
from dmin_diffusers.app import build_app, explain, generate_image, row_link, timestep_chart
from tiny_models import make_caption_dataset, make_image_dataset, tiny_pipeline

NUM_ROWS = 6


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    pipe = tiny_pipeline("stable-diffusion", pipeline_class=dm.DMinStableDiffusionPipeline, lora_rank=4)
    data = make_caption_dataset(NUM_ROWS)
    pipe.build_attribution_index(data, tmp_path_factory.mktemp("sd") / "index",
                                 config=dm.DMinConfig(num_timesteps=3, projection_dim=256), progress=False)
    return pipe, data


def test_timestep_scores_split_each_score_over_the_timesteps(sd):
    pipe, data = sd
    for exact in (True, False):
        result = pipe.attribute(data[2]["image"], data[2]["text"], top_k=4, exact=exact)
        assert result.timestep_scores.shape == (4, 3)
        np.testing.assert_allclose(result.timestep_scores.sum(axis=1), result.scores, rtol=1e-4, atol=1e-5)


def test_explain_lays_out_the_top_rows(sd):
    pipe, data = sd
    page = explain(pipe, data[4]["image"], data[4]["text"], top_k=3, exact=True)
    assert page.result.indices[0] == 4 and len(page.gallery) == 3
    picture, label = page.gallery[0]
    assert label.startswith(f"#1 · row 4 · {page.result.scores[0]:.3f}") and data[4]["text"] in label
    assert picture.size == (128, 128)  # 32x32 rows are enlarged for the gallery
    assert page.table.count("\n") == 2 + 2 and data[4]["text"] in page.table
    assert page.status.startswith(f"top-3 of {NUM_ROWS} rows in ") and "exact" in page.status
    assert page.chart.size == (480, 240) and page.query.size == (128, 128)  # enlarged like the rows


def test_generate_then_explain_for_text_to_image_and_unconditional(sd, tmp_path):
    pipe, _ = sd
    image = generate_image(pipe, "a red circle on the left", seed=1, num_inference_steps=2, guidance_scale=5.0)
    assert isinstance(image, PIL.Image.Image) and image.size == (32, 32)
    assert explain(pipe, image, "a red circle on the left", top_k=2).status.endswith("(HNSW candidates re-ranked exactly)")
    with pytest.raises(ValueError, match="type a prompt"):
        generate_image(pipe, "", seed=0, num_inference_steps=2)

    ddpm = tiny_pipeline("ddpm", pipeline_class=dm.DMinDDPMPipeline)
    ddpm.build_attribution_index(make_image_dataset(4), tmp_path / "ddpm",
                                 config=dm.DMinConfig(num_timesteps=2, projection_dim=256), progress=False)
    image = generate_image(ddpm, "ignored", seed=0, num_inference_steps=2)
    page = explain(ddpm, image, "ignored for unconditional models", top_k=2)
    assert len(page.gallery) == 2 and page.result.prompt is None and "caption" not in page.table


def test_rows_without_their_dataset_still_show_ranks_and_scores(sd, tmp_path):
    pipe, data = sd
    other = tiny_pipeline("stable-diffusion", pipeline_class=dm.DMinStableDiffusionPipeline, lora_rank=4)
    other.load_attribution_index(pipe.attribution_index.directory)  # no dataset given, none on the Hub
    page = explain(other, data[1]["image"], data[1]["text"], top_k=2)
    assert [label.split(" · ")[1] for _, label in page.gallery] == [f"row {i}" for i in page.result.indices]
    assert "images unavailable" in page.status


def test_row_links_point_at_the_hub_dataset_viewer():
    info = {"name": "user/shapes", "config_name": None, "split": "train"}
    assert row_link(info, 7).endswith("/datasets/user/shapes/viewer/default/train?row=7")
    assert row_link({"name": None}, 7) is None and row_link({"name": "local-name"}, 7) is None


def test_chart_draws_one_line_per_row():
    chart = timestep_chart(np.array([[0.1, 0.5, 0.2], [0.3, 0.0, -0.1]]), [100, 500, 900], [4, 2])
    colours = {tuple(pixel) for pixel in np.asarray(chart).reshape(-1, 3)}
    assert (31, 119, 180) in colours and (255, 127, 14) in colours  # the first two palette colours


def test_build_app_needs_an_index():
    with pytest.raises(TypeError, match="enable_attribution"):
        build_app(tiny_pipeline("stable-diffusion"))
    with pytest.raises(ValueError, match="attach an index"):
        build_app(tiny_pipeline("stable-diffusion", pipeline_class=dm.DMinStableDiffusionPipeline))


def test_build_app_makes_a_page(sd):
    import gradio as gr

    pipe, _ = sd
    demo = build_app(pipe, top_k=3)
    assert isinstance(demo, gr.Blocks)
    ids = {block.elem_id for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    assert {"dmin-prompt", "dmin-generate", "dmin-gallery", "dmin-rows", "dmin-chart", "dmin-status"} <= ids


def test_dmin_app_serves_a_saved_pipeline_index_and_dataset(tmp_path, monkeypatch):
    """`dmin app` as the README runs it after the quickstart: a saved DDPM pipeline, its index and the training
    rows written with save_to_disk (launch is replaced so the test does not serve forever)."""
    import gradio as gr

    from dmin_diffusers.cli import main

    pipe, data = tiny_pipeline("ddpm", pipeline_class=dm.DMinDDPMPipeline), make_image_dataset(5)
    pipe.build_attribution_index(data, tmp_path / "index", config=dm.DMinConfig(num_timesteps=2, projection_dim=256),
                                 progress=False)
    pipe.save_pretrained(tmp_path / "pipeline")
    data.save_to_disk(str(tmp_path / "train-dataset"))
    launched = {}

    def launch(self, **kwargs):
        launched.update(kwargs, demo=self)

    monkeypatch.setattr(gr.Blocks, "launch", launch)
    assert main(["app", "--pretrained_model_name_or_path", str(tmp_path / "pipeline"), "--index",
                 str(tmp_path / "index"), "--dataset_name", str(tmp_path / "train-dataset"), "--port", "7999",
                 "--device", "cpu"]) == 0
    # only what was given: Gradio takes the rest from GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, else its defaults
    assert "server_name" not in launched and launched["server_port"] == 7999
    handler = launched["demo"].fns[0].fn  # "Generate and attribute"
    query, gallery, table, chart, status = handler("", 0, 2, 7.5, 3, True)
    assert len(gallery) == 3 and status == status.split("; images unavailable")[0]  # rows from the saved dataset
    assert status.startswith("top-3 of 5 rows")
