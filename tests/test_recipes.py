"""The recipe options of DMinConfig (output function, timestep spacing, noise): each changes the vectors the way it
claims, deterministically, for training rows and queries alike; the paper's recipe stays one call away, and an
index written before the options existed keeps the recipe it was built with."""

import pytest
import torch

import dmin_diffusers as dm
from dmin_diffusers.config import PAPER_RECIPE
from dmin_diffusers.families import detect_family
from dmin_diffusers.gradients import GradientSketcher
from dmin_diffusers.resolution import resolve_config, spread_timesteps
from tiny_models import make_caption_dataset, make_image_dataset, tiny_pipeline

OPTIONS = [
    {"output_function": "squared_norm"},
    {"output_function": "mean"},
    {"timestep_spacing": "linspace"},
    {"timestep_spacing": "cubic"},
    {"noise": "per_timestep"},
    {"noise_draws": 3},
]
FAMILIES = {
    "ddpm": (dm.DMinDDPMPipeline, None, 1024),
    "stable-diffusion": (dm.DMinStableDiffusionPipeline, 4, 1024),
    "sd3": (dm.DMinStableDiffusion3Pipeline, 4, 256),
}


def sketcher_for(pipe, **fields):
    family = detect_family(pipe)
    config = resolve_config(dm.DMinConfig.paper(num_timesteps=3, projection_dim=256).replace(**fields), family)
    return GradientSketcher(family, config)


@pytest.fixture(scope="module")
def sd():
    pipe = tiny_pipeline("stable-diffusion", lora_rank=4)
    row = make_caption_dataset(1)[0]
    return pipe, row


def test_paper_recipe_is_one_call_away():
    paper = dm.DMinConfig.paper(projection_dim=1024)
    assert {key: getattr(paper, key) for key in PAPER_RECIPE} == PAPER_RECIPE
    assert paper.projection_dim == 1024


def test_an_index_config_from_before_the_recipe_fields_keeps_the_papers_recipe():
    old = {key: value for key, value in dm.DMinConfig().to_dict().items() if key not in PAPER_RECIPE}
    old["format_version"] = 1
    loaded = dm.DMinConfig.from_dict(old)
    assert {key: getattr(loaded, key) for key in PAPER_RECIPE} == PAPER_RECIPE


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"output_function": "l3"}, "output_function"),
        ({"timestep_spacing": "random"}, "timestep_spacing"),
        ({"noise": "fresh"}, "noise must be one of"),
        ({"noise_draws": 0}, "noise_draws"),
        ({"noise_draws": 2.0}, "noise_draws"),
    ],
)
def test_recipe_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dm.DMinConfig(**kwargs)


def test_timestep_spacings():
    assert spread_timesteps(10, 1000, "centres") == [50, 150, 250, 350, 450, 550, 650, 750, 850, 950]
    assert spread_timesteps(10, 1000, "linspace") == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    cubic = spread_timesteps(10, 1000, "cubic")
    assert cubic[0] == 0 and cubic[-1] == 998 and len(set(cubic)) == 10
    assert sum(t > 700 for t in cubic) == 6  # packed at high noise, as the official DMin code
    assert spread_timesteps(1, 1000, "linspace") == [499]
    with pytest.raises(ValueError, match="same step"):
        spread_timesteps(900, 1000, "cubic")


def test_each_option_changes_the_vector_deterministically(sd):
    pipe, row = sd
    reference = sketcher_for(pipe)
    example = reference.prepare(row["image"], row["text"])
    paper = reference.sketch(example)
    for fields in OPTIONS:
        first = sketcher_for(pipe, **fields)
        vector = first.sketch(example)
        torch.testing.assert_close(vector, sketcher_for(pipe, **fields).sketch(example), rtol=0, atol=0)
        assert torch.isfinite(vector).all()
        similarity = torch.nn.functional.cosine_similarity(vector.flatten(), paper.flatten(), dim=0)
        assert similarity < 0.999, (fields, similarity)


def test_output_functions_are_what_they_say(sd):
    pipe, row = sd
    family = detect_family(pipe)
    for name in ("loss", "squared_norm", "mean"):
        sketcher = sketcher_for(pipe, output_function=name, noise_draws=2)
        example = sketcher.prepare(row["image"], row["text"])
        noise = sketcher.noise(example.latents, 1)
        assert noise.shape == (2, *example.latents.shape[1:])
        per_draw = []
        for draw in noise:
            noised = sketcher.objective.noised(example.latents, draw[None], sketcher.config.timesteps[1])
            with torch.no_grad():
                prediction = family.predict(noised.noisy, noised.model_timestep, example.conditioning)
            per_draw.append({"loss": (prediction - noised.target).square().mean(),
                             "squared_norm": prediction.square().sum(), "mean": prediction.mean()}[name])
        with torch.no_grad():
            torch.testing.assert_close(sketcher.output(example, 1), torch.stack(per_draw).mean(), rtol=1e-4, atol=1e-6)


def test_noise_modes():
    pipe = tiny_pipeline("ddpm")
    latents = torch.zeros(1, 3, 16, 16)
    shared = sketcher_for(pipe)
    per_timestep = sketcher_for(pipe, noise="per_timestep")
    assert all(torch.equal(shared.noise(latents, i), shared.noise(latents, 0)) for i in range(3))
    torch.testing.assert_close(per_timestep.noise(latents, 0), shared.noise(latents, 0), rtol=0, atol=0)
    assert not torch.equal(per_timestep.noise(latents, 1), per_timestep.noise(latents, 0))
    # the paper's noise is unchanged from earlier versions: one draw of the latent's shape from the seed
    expected = torch.randn((1, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(shared.noise(latents), expected, rtol=0, atol=0)


def test_output_functions_of_the_model_alone_do_not_depend_on_the_objective():
    """The squared norm and the mean use the prediction only: the same weights under an epsilon and a sample
    objective give the same vectors, while the training loss, whose target differs, does not."""
    rows = {}
    for prediction_type in ("epsilon", "sample"):
        pipe = tiny_pipeline("stable-diffusion", lora_rank=4, prediction_type=prediction_type)
        row = make_caption_dataset(1)[0]
        for name in ("loss", "squared_norm"):
            sketcher = sketcher_for(pipe, output_function=name)
            rows[prediction_type, name] = sketcher.sketch(sketcher.prepare(row["image"], row["text"]))
    torch.testing.assert_close(rows["epsilon", "squared_norm"], rows["sample", "squared_norm"])
    assert not torch.allclose(rows["epsilon", "loss"], rows["sample", "loss"], atol=1e-3)


@pytest.mark.parametrize("kind", list(FAMILIES))
@pytest.mark.parametrize("fields", OPTIONS, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_self_retrieval_holds_for_every_option(kind, fields, tmp_path):
    pipeline_class, lora_rank, dim = FAMILIES[kind]
    pipe = tiny_pipeline(kind, pipeline_class=pipeline_class, lora_rank=lora_rank)
    dataset = make_image_dataset(6) if kind == "ddpm" else make_caption_dataset(6)
    config = dm.DMinConfig(num_timesteps=3, projection_dim=dim, **fields)
    index = pipe.build_attribution_index(dataset, tmp_path / "index", config=config, progress=False)
    assert {key: getattr(index.config, key) for key in fields} == fields
    for row in range(len(dataset)):
        prompt = None if kind == "ddpm" else dataset[row]["text"]
        assert pipe.attribute(dataset[row]["image"], prompt, top_k=2, exact=True).indices[0] == row, (kind, row)


def test_training_scripts_and_the_cli_choose_the_recipe():
    import argparse

    from callbacks import GradientCacheCallback
    from dmin_diffusers.cli import build_parser

    args = argparse.Namespace(output_dir="out", resolution=32, dmin_output_function="squared_norm", dmin_noise_draws=2,
                              dmin_timestep_spacing="cubic")
    config = GradientCacheCallback.from_training_args(args).config
    assert (config.output_function, config.noise_draws, config.timestep_spacing) == ("squared_norm", 2, "cubic")
    assert config.num_timesteps == dm.DMinConfig().num_timesteps  # unset fields keep DMinConfig's defaults
    with pytest.raises(ValueError, match="num_timesteps"):  # 0 is refused, not silently replaced by a default
        GradientCacheCallback.from_training_args(argparse.Namespace(output_dir="out", dmin_num_timesteps=0))

    parsed = build_parser().parse_args(["cache", "--pretrained_model_name_or_path", "x", "--output_dir", "o",
                                        "--output_function", "squared_norm", "--noise", "per_timestep",
                                        "--paper_recipe"])
    assert (parsed.dmin_output_function, parsed.dmin_noise, parsed.paper_recipe) == ("squared_norm", "per_timestep",
                                                                                    True)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["cache", "--pretrained_model_name_or_path", "x", "--output_dir", "o",
                                   "--timestep_spacing", "random"])
