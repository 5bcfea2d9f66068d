"""End to end on tiny pipelines of each family: caching, self-retrieval, round trips and errors."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableDiffusionPipeline

import dmin_diffusers as dm
from dmin_diffusers.families import detect_family
from dmin_diffusers.gradients import GradientSketcher
from tiny_models import make_caption_dataset, make_image_dataset, tiny_pipeline

# case: (kind, ready-made class, LoRA rank or None for the whole denoiser, K). The tracked parameters are larger
# than K in every case, so the vectors really are compressed. Each family is covered the ways its training
# scripts train it: DDPM in full, the text-to-image families with a LoRA and in full.
CASES = {
    "ddpm": ("ddpm", dm.DMinDDPMPipeline, None, 1024),
    "sd-lora": ("stable-diffusion", dm.DMinStableDiffusionPipeline, 4, 1024),
    "sd-full": ("stable-diffusion", dm.DMinStableDiffusionPipeline, None, 1024),
    "sdxl-lora": ("sdxl", dm.DMinStableDiffusionXLPipeline, 4, 1024),
    "sdxl-full": ("sdxl", dm.DMinStableDiffusionXLPipeline, None, 1024),
    "sd3-lora": ("sd3", dm.DMinStableDiffusion3Pipeline, 4, 256),
    "sd3-full": ("sd3", dm.DMinStableDiffusion3Pipeline, None, 1024),
    "flux-lora": ("flux", dm.DMinFluxPipeline, 4, 256),
    "flux-full": ("flux", dm.DMinFluxPipeline, None, 1024),
}
FAMILIES = {"ddpm": "ddpm", "stable-diffusion": "sd-lora", "sd3": "sd3-lora"}  # the default case of a kind
NUM_ROWS = 10
# Flux's native size is the pipeline's default_sample_size (128) x its VAE factor; the tiny models train at 32
SIZE = {"flux": 32}


def make_pipeline(case, **kwargs):
    kind, pipeline_class, lora_rank, _ = CASES[FAMILIES.get(case, case)]
    kwargs.setdefault("lora_rank", lora_rank)
    return tiny_pipeline(kind, pipeline_class=pipeline_class, **kwargs)


def kind_of(case):
    return CASES[FAMILIES.get(case, case)][0]


def make_dataset(case):
    return make_image_dataset(NUM_ROWS) if kind_of(case) == "ddpm" else make_caption_dataset(NUM_ROWS)


def make_config(case, **kwargs):
    kind = kind_of(case)
    kwargs.setdefault("resolution", SIZE.get(kind))
    return dm.DMinConfig(num_timesteps=4, projection_dim=CASES[FAMILIES.get(case, case)][3], seed=0, **kwargs)


def prompt_of(case, dataset, row):
    return None if kind_of(case) == "ddpm" else dataset[row]["text"]


@pytest.fixture(scope="module", params=list(CASES))
def built(request, tmp_path_factory):
    case = request.param
    pipe, dataset = make_pipeline(case), make_dataset(case)
    directory = tmp_path_factory.mktemp(case) / "index"
    index = pipe.build_attribution_index(dataset, directory, config=make_config(case), progress=False)
    return case, pipe, dataset, index


def test_training_rows_retrieve_themselves_first(built):
    case, pipe, dataset, index = built
    assert index.num_rows == NUM_ROWS
    images = [dataset[row]["image"] for row in range(NUM_ROWS)]
    prompts = [prompt_of(case, dataset, row) for row in range(NUM_ROWS)]
    # the whole training set as one batch of queries, scored exactly and through HNSW
    every_exact = pipe.attribute(images, prompts, top_k=3, exact=True)
    every_approximate = pipe.attribute(images, prompts, top_k=3)
    for row, (exact, approximate) in enumerate(zip(every_exact, every_approximate)):
        assert exact.indices[0] == row, (case, row, exact.indices, exact.scores)
        assert approximate.indices[0] == row, (case, row, approximate.indices)
        assert exact.prompt == prompts[row]
        assert exact.scores == sorted(exact.scores, reverse=True)
        np.testing.assert_allclose(approximate.scores[0], exact.scores[0], rtol=1e-5)


def test_training_rows_retrieve_themselves_under_every_preconditioning(built, tmp_path):
    """Each preconditioning, fitted from the same stored rows (exact search and HNSW)."""
    case, pipe, dataset, index = built
    vectors = [pipe.attribution_vector(dataset[row]["image"], prompt_of(case, dataset, row)) for row in range(NUM_ROWS)]
    index.save_pretrained(tmp_path / "copy")
    copy = dm.AttributionIndex(tmp_path / "copy")
    for method in ("centered", "kernel", "centered-kernel"):
        copy.refit(method)
        for row, vector in enumerate(vectors):
            assert copy.search(vector, top_k=2, exact=True)[0][0] == row, (case, method, row)
            assert copy.search(vector, top_k=2)[0][0] == row, (case, method, row)


def test_config_records_what_the_vectors_depend_on(built):
    case, pipe, _, index = built
    kind, config = kind_of(case), index.config
    assert config.family == kind
    assert config.objective == ("flow_matching" if kind in ("sd3", "flux") else "epsilon")
    assert config.timesteps == [125, 375, 625, 875]
    assert config.resolution == (16 if kind == "ddpm" else 32)
    assert config.max_sequence_length == {"sd3": 77, "flux": 512}.get(kind)
    tracked = [name for name, _ in config.parameters]
    denoiser = detect_family(pipe).denoiser
    if CASES[case][2] is None:
        assert len(tracked) == len(list(denoiser.parameters())) and not any(".lora_" in name for name in tracked)
    else:
        assert tracked and all(".lora_" in name for name in tracked)
    assert dm.DMinConfig.from_json_file(index.directory / "dmin_config.json") == config


def test_generated_image_in_every_output_type_gives_the_same_answer(built):
    case, pipe, dataset, _ = built
    prompt = prompt_of(case, dataset, 0)
    call = {"num_inference_steps": 2, "generator": None}
    if prompt is not None:
        call["prompt"] = prompt
    if kind_of(case) in SIZE:
        call["height"] = call["width"] = SIZE[kind_of(case)]
    answers = []
    for output_type in ("pil", "np", "pt"):
        call["generator"] = torch.Generator().manual_seed(0)
        images = pipe(output_type=output_type, **call).images
        (result,) = pipe.attribute(images, prompt, top_k=NUM_ROWS + 5, exact=True)  # a batch of one: one result
        answers.append(result.indices)
    assert answers[0] == answers[1] == answers[2]
    assert sorted(answers[0]) == list(range(NUM_ROWS))  # top_k beyond the row count returns every row


def test_result_examples_and_grid(built):
    case, pipe, dataset, _ = built
    result = pipe.attribute(dataset[2]["image"], prompt_of(case, dataset, 2), top_k=4)
    assert [example["image"].size for example in result.examples] == [dataset[i]["image"].size for i in result.indices]
    if kind_of(case) != "ddpm":
        assert result.examples[0]["text"] == dataset[2]["text"]
    grid = result.to_image(tile_size=32, columns=5)
    assert grid.size == (5 * 32, 1 * (32 + 14))
    # the first training tile shows the top row's image
    top_tile = np.asarray(grid.crop((32, 0, 64, 32)).convert("RGB"), dtype=float)
    top_image = dataset[result.indices[0]]["image"].convert("RGB")
    expected = np.asarray(top_image.resize((32, 32), PIL.Image.NEAREST), dtype=float)
    assert np.abs(top_tile - expected).mean() < 1.0


def test_save_and_load_into_a_fresh_pipeline(built, tmp_path):
    case, pipe, dataset, index = built
    index.save_pretrained(tmp_path / "copy")
    fresh = make_pipeline(case)
    loaded = fresh.load_attribution_index(tmp_path / "copy", dataset=dataset)
    assert loaded.num_rows == NUM_ROWS
    image, prompt = dataset[5]["image"], prompt_of(case, dataset, 5)
    for exact in (True, False):
        before = pipe.attribute(image, prompt, top_k=5, exact=exact)
        after = fresh.attribute(image, prompt, top_k=5, exact=exact)
        assert before.indices == after.indices
        np.testing.assert_allclose(before.scores, after.scores, rtol=1e-6, atol=1e-5)
    assert fresh.attribute(image, prompt, top_k=1).examples[0]["image"].size == image.size


def test_vectors_are_deterministic(built):
    case, pipe, dataset, index = built
    image, prompt = dataset[3]["image"], prompt_of(case, dataset, 3)
    first = pipe.attribution_vector(image, prompt)
    second = pipe.attribution_vector(image, prompt)
    assert torch.equal(first, second)
    stored = index.store.get_rows([3])[0]  # float16, from a batch of another size (rounding differs a little)
    torch.testing.assert_close(stored, first.reshape(-1), rtol=2e-3, atol=1e-5)


def test_rebuilding_gives_identical_rows(tmp_path):
    dataset = make_dataset("ddpm")
    stores = []
    for name in ("a", "b"):
        pipe = make_pipeline("ddpm")
        index = pipe.build_attribution_index(dataset, tmp_path / name, config=make_config("ddpm"), progress=False)
        stores.append(index.store.get_rows(list(range(NUM_ROWS))))
    assert torch.equal(stores[0], stores[1])


def test_tracked_parameters_are_restored_after_caching(built):
    case, pipe, dataset, _ = built
    denoiser = detect_family(pipe).denoiser
    before = {name: p.requires_grad for name, p in denoiser.named_parameters()}
    pipe.attribution_vector(dataset[0]["image"], prompt_of(case, dataset, 0))
    assert {name: p.requires_grad for name, p in denoiser.named_parameters()} == before
    assert all(p.grad is None for p in denoiser.parameters())


def test_coarse_knn_is_reranked_on_the_full_rows(tmp_path):
    pipe, dataset = make_pipeline("stable-diffusion"), make_dataset("stable-diffusion")
    config = make_config("stable-diffusion", knn_dim=64)
    pipe.build_attribution_index(dataset, tmp_path / "coarse", config=config, progress=False)
    for row in range(NUM_ROWS):
        approximate = pipe.attribute(dataset[row]["image"], dataset[row]["text"], top_k=3)
        exact = pipe.attribute(dataset[row]["image"], dataset[row]["text"], top_k=3, exact=True)
        assert approximate.indices[0] == row
        np.testing.assert_allclose(approximate.scores[0], exact.scores[0], rtol=1e-5)


def test_a_failing_build_keeps_finished_rows_and_resumes(tmp_path, monkeypatch):
    pipe, dataset = make_pipeline("ddpm"), make_dataset("ddpm")
    config = make_config("ddpm", shard_size=2)
    prepare, calls = GradientSketcher.prepare, []

    def fails_at_row_7(self, image, prompt):
        calls.append(1)
        if len(calls) == 8:
            raise RuntimeError("out of memory (simulated)")
        return prepare(self, image, prompt)

    monkeypatch.setattr(GradientSketcher, "prepare", fails_at_row_7)
    with pytest.raises(RuntimeError, match="simulated"):
        pipe.build_attribution_index(dataset, tmp_path / "index", config=config, progress=False)
    monkeypatch.undo()
    part = json.loads((tmp_path / "index" / "vectors" / "part-000-of-001.json").read_text())
    assert sum(shard["rows"] for shard in part["shards"]) == 7  # rows 0-6 survived the failure
    resumed = pipe.build_attribution_index(dataset, tmp_path / "index", config=config, progress=False)
    clean = make_pipeline("ddpm").build_attribution_index(dataset, tmp_path / "clean", config=config, progress=False)
    rows = list(range(NUM_ROWS))
    assert torch.equal(resumed.store.get_rows(rows), clean.store.get_rows(rows))


# ---------------------------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def sd_built(tmp_path_factory):
    pipe, dataset = make_pipeline("stable-diffusion"), make_dataset("stable-diffusion")
    directory = tmp_path_factory.mktemp("sd") / "index"
    pipe.build_attribution_index(dataset, directory, config=make_config("stable-diffusion"), progress=False)
    return pipe, dataset, directory


def test_index_of_another_adapter_is_refused_unless_not_strict(sd_built):
    _, dataset, directory = sd_built
    other = make_pipeline("stable-diffusion", lora_rank=8)
    with pytest.raises(ValueError, match="does not belong.*tracked parameters.*different shape"):
        other.load_attribution_index(directory)
    with pytest.warns(UserWarning, match="does not belong"):
        other.load_attribution_index(directory, strict=False)
    assert len(other.attribute(dataset[0]["image"], dataset[0]["text"], top_k=2).indices) == 2


def test_index_of_another_family_is_refused(sd_built):
    _, _, directory = sd_built
    with pytest.raises(ValueError, match="family: 'stable-diffusion' != 'sd3'"):
        make_pipeline("sd3").load_attribution_index(directory)


def test_prompt_errors(sd_built):
    pipe, dataset, _ = sd_built
    with pytest.raises(ValueError, match="needs the prompt"):
        pipe.attribute(dataset[0]["image"])
    with pytest.raises(TypeError, match="one image takes one prompt"):
        pipe.attribute(dataset[0]["image"], ["a", "b"])
    with pytest.raises(TypeError, match="prompt must be a string"):
        pipe.attribute(dataset[0]["image"], 3)
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        pipe.attribute([dataset[0]["image"]] * 2, ["a", "b", "c"])
    with pytest.raises(ValueError, match="empty"):
        pipe.attribute([], "a")
    ddpm = make_pipeline("ddpm")
    ddpm.build_attribution_index(make_dataset("ddpm").select(range(2)), sd_built[2].parent / "ddpm",
                                 config=make_config("ddpm"), progress=False)
    with pytest.raises(ValueError, match="unconditional"):
        ddpm.attribute(make_dataset("ddpm")[0]["image"], "a prompt")


def test_image_errors(sd_built):
    pipe, dataset, _ = sd_built
    prompt = dataset[0]["text"]
    with pytest.raises(TypeError, match="PIL image, numpy array or torch tensor"):
        pipe.attribute("image.png", prompt)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        pipe.attribute(np.full((32, 32, 3), 3.0, dtype=np.float32), prompt)
    with pytest.raises(ValueError, match="channels"):
        pipe.attribute(np.zeros((32, 32, 7), dtype=np.uint8), prompt)
    with pytest.raises(ValueError, match="top_k"):
        pipe.attribute(dataset[0]["image"], prompt, top_k=0)


def test_dataset_errors(tmp_path):
    pipe, dataset = make_pipeline("stable-diffusion"), make_dataset("stable-diffusion")
    with pytest.raises(ValueError, match="caption_column 'caption' is not a column.*'image', 'text'"):
        pipe.build_attribution_index(dataset, tmp_path / "a", caption_column="caption")
    with pytest.raises(ValueError, match="image_column 'img' is not a column"):
        pipe.build_attribution_index(dataset, tmp_path / "a", image_column="img")
    with pytest.raises(TypeError, match="datasets.Dataset"):
        pipe.build_attribution_index([dataset[0]], tmp_path / "a")
    with pytest.raises(ValueError, match="no attribution index is attached"):
        pipe.attribute(dataset[0]["image"], dataset[0]["text"])
    assert not (tmp_path / "a").exists()


def test_existing_directories_are_never_overwritten(sd_built, tmp_path):
    pipe, dataset, directory = sd_built
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty and is not an attribution index"):
        pipe.build_attribution_index(dataset, foreign, config=make_config("stable-diffusion"))
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]

    before = {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="other settings.*projection_dim: 1024 != 512"):
        pipe.build_attribution_index(dataset, directory, config=dm.DMinConfig(num_timesteps=4, projection_dim=512))
    with pytest.raises(ValueError, match="another dataset"):
        pipe.build_attribution_index(dataset.select(range(4)), directory, config=make_config("stable-diffusion"))
    assert {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()} == before


def test_unsupported_pipeline_is_refused():
    class NotAPipeline:
        pass

    with pytest.raises(TypeError, match="expected a diffusers pipeline"):
        dm.enable_attribution(NotAPipeline())


def test_from_pipe_keeps_the_index_and_unload_removes_it(sd_built, tmp_path):
    pipe, dataset, directory = sd_built
    image, prompt = dataset[4]["image"], dataset[4]["text"]
    expected = pipe.attribute(image, prompt, top_k=3, exact=True)

    reused = dm.DMinStableDiffusionPipeline.from_pipe(pipe)  # diffusers' way to reuse components
    assert reused.unet is pipe.unet and reused.attribution_index is pipe.attribution_index
    assert reused.attribute(image, prompt, top_k=3, exact=True).indices == expected.indices

    plain = StableDiffusionPipeline.from_pipe(pipe)
    assert not isinstance(plain, dm.InfluenceMixin)
    again = dm.DMinStableDiffusionPipeline.from_pipe(plain)
    assert again.attribution_index is None
    again.load_attribution_index(directory)
    assert again.attribute(image, prompt, top_k=3, exact=True).indices == expected.indices
    again.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"

    again.unload_attribution_index()
    assert again.attribution_index is None
    with pytest.raises(ValueError, match="no attribution index is attached"):
        again.attribute(image, prompt)
    assert pipe.attribution_index is not None  # the other pipelines keep theirs
