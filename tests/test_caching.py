"""Issue 3: caching after training (callback), resume after a kill, several processes, and the `dmin` CLI."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from diffusers import StableDiffusionPipeline
from peft import get_peft_model_state_dict

import dmin_diffusers as dm
from dmin_diffusers.callbacks import GradientCacheCallback
from dmin_diffusers.cli import main as dmin_main
from dmin_diffusers.inputs import preprocess_image
from tiny_models import add_lora, make_caption_dataset, tiny_pipeline
from dmin_diffusers.training_data import load_training_dataset

NUM_ROWS = 8
# a 9 MB batch holds 3 samples (one row) of the tiny model: batched, and killed between rows
SETTINGS = ["--num_timesteps", "3", "--projection_dim", "512", "--shard_size", "1", "--resolution", "32",
            "--batch_memory_mb", "9"]


def rows_of(directory):
    index = dm.AttributionIndex.from_pretrained(directory)
    return index.store.get_rows(list(range(index.num_rows)))


# ------------------------------------------------------------------------------------ training callback


def test_callback_after_an_accelerate_lora_training_loop(tmp_path):
    accelerator = Accelerator(cpu=True)
    pipe = tiny_pipeline("stable-diffusion", lora_rank=4)
    unet, tokenizer, text_encoder, vae = pipe.unet, pipe.tokenizer, pipe.text_encoder, pipe.vae
    train_dataset = make_caption_dataset(NUM_ROWS)

    def preprocess_train(examples):  # as train_text_to_image_lora.py attaches with with_transform
        examples["pixel_values"] = [preprocess_image(image, 32)[0] for image in examples["image"]]
        examples["input_ids"] = tokenizer(
            examples["text"], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids
        return examples

    train_dataset = train_dataset.with_transform(preprocess_train)
    loader = torch.utils.data.DataLoader(
        train_dataset, batch_size=4, shuffle=True,
        collate_fn=lambda rows: {
            "pixel_values": torch.stack([r["pixel_values"] for r in rows]),
            "input_ids": torch.stack([r["input_ids"] for r in rows]),
        },
    )
    lora_parameters = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora_parameters, lr=1e-3)
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    scheduler = pipe.scheduler
    unet.train()
    torch.manual_seed(0)
    for step, batch in zip(range(4), loader):
        latents = vae.encode(batch["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],))
        noisy = scheduler.add_noise(latents, noise, timesteps)
        hidden = text_encoder(batch["input_ids"])[0]
        loss = torch.nn.functional.mse_loss(unet(noisy, timesteps, hidden).sample, noise)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()

    # what a user adds after the loop (see callbacks/README.md)
    args = argparse.Namespace(output_dir=str(tmp_path), resolution=32, image_column="image", caption_column="text",
                              seed=0, dmin_num_timesteps=4, dmin_projection_dim=1024)
    pipe.unet = accelerator.unwrap_model(unet)
    callback = GradientCacheCallback.from_training_args(args)
    index = callback.on_train_end(accelerator=accelerator, pipeline=pipe, dataset=train_dataset)

    assert Path(index.directory) == tmp_path / "dmin-index"
    assert index.num_rows == NUM_ROWS and index.config.num_timesteps == 4
    raw = make_caption_dataset(NUM_ROWS)
    for row in range(NUM_ROWS):
        assert pipe.attribute(raw[row]["image"], raw[row]["text"], top_k=1, exact=True).indices == [row]
        assert pipe.attribute(raw[row]["image"], raw[row]["text"], top_k=1).indices == [row]


def test_max_train_samples_reproduces_the_training_selection(tmp_path):
    folder = write_imagefolder(tmp_path / "data")
    full = load_training_dataset(train_data_dir=str(folder))
    chosen = load_training_dataset(train_data_dir=str(folder), max_train_samples=5, seed=42)
    expected = full.shuffle(seed=42).select(range(5))
    assert chosen["text"] == expected["text"] and len(chosen) == 5
    with pytest.raises(ValueError, match="seed"):
        load_training_dataset(train_data_dir=str(folder), max_train_samples=5)


# ------------------------------------------------------------------------ the CLI on files on disk


def write_imagefolder(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    dataset = make_caption_dataset(NUM_ROWS)
    with open(folder / "metadata.jsonl", "w") as handle:
        for row in range(NUM_ROWS):
            name = f"row_{row:03d}.png"
            dataset[row]["image"].save(folder / name)
            handle.write(json.dumps({"file_name": name, "text": dataset[row]["text"]}) + "\n")
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved base pipeline, LoRA weights beside it (as a training run leaves them), and an imagefolder."""
    root = tmp_path_factory.mktemp("files")
    base = tiny_pipeline("stable-diffusion", tokenizer_dir=root / "tokenizer")
    base.save_pretrained(root / "base")
    add_lora(base.unet, rank=4, seed=3)
    StableDiffusionPipeline.save_lora_weights(root / "lora", unet_lora_layers=get_peft_model_state_dict(base.unet))
    return {"base": root / "base", "lora": root / "lora", "data": write_imagefolder(root / "data"), "root": root}


def cache_command(files, output_dir):
    return ["cache", "--pretrained_model_name_or_path", str(files["base"]), "--lora_weights", str(files["lora"]),
            "--train_data_dir", str(files["data"]), "--index_dir", str(output_dir), *SETTINGS]


def run_cli(arguments, launcher=(sys.executable, "-m", "dmin_diffusers.cli"), **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([*launcher, *arguments], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kwargs)


@pytest.fixture(scope="module")
def uninterrupted(files):
    output = files["root"] / "uninterrupted"
    process = run_cli(cache_command(files, output))
    log, _ = process.communicate(timeout=300)
    assert process.returncode == 0, log
    assert f"DMin cache: {NUM_ROWS} rows" in log
    return output


def test_cli_caches_an_imagefolder_and_attributes_its_rows(files, uninterrupted, capsys):
    index = dm.AttributionIndex.from_pretrained(uninterrupted)
    assert index.num_rows == NUM_ROWS
    assert index.dataset_info["split"] == "train" and index.dataset_info["caption_column"] == "text"
    assert all(".lora_" in name and ".default" not in name for name, _ in index.config.parameters)
    for row in (0, 5):
        code = dmin_main(["attribute", "--pretrained_model_name_or_path", str(files["base"]), "--lora_weights",
                          str(files["lora"]), "--index", str(uninterrupted), "--image",
                          str(files["data"] / f"row_{row:03d}.png"), "--prompt", make_caption_dataset(NUM_ROWS)[row]["text"],
                          "--top_k", "3"])
        assert code == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [line["rank"] for line in lines] == [1, 2, 3] and lines[0]["row"] == row


def test_cli_refuses_other_settings_for_an_existing_index(files, uninterrupted, capsys):
    before = sorted(p.name for p in uninterrupted.rglob("*"))
    arguments = cache_command(files, uninterrupted)
    arguments[arguments.index("--projection_dim") + 1] = "256"
    assert dmin_main(arguments) == 2
    assert "other settings" in capsys.readouterr().err
    assert sorted(p.name for p in uninterrupted.rglob("*")) == before


def test_a_killed_run_resumes_to_the_same_rows(files, uninterrupted, tmp_path):
    output = tmp_path / "killed"
    process = run_cli(cache_command(files, output))
    part = output / "vectors" / "part-000-of-001.json"
    deadline = time.time() + 240
    while time.time() < deadline:
        if part.exists() and len(json.loads(part.read_text())["shards"]) >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    finished = len(json.loads(part.read_text())["shards"])
    assert 3 <= finished < NUM_ROWS, "the run was not killed part-way"
    assert not (output / "manifest.json").exists()

    resumed = run_cli(cache_command(files, output))
    log, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, log
    assert f"{NUM_ROWS - finished} computed" in log  # finished rows were not recomputed
    manifest = json.loads((output / "manifest.json").read_text())
    assert sum(shard["rows"] for shard in manifest["shards"]) == NUM_ROWS  # none lost, none duplicated
    assert torch.equal(rows_of(output), rows_of(uninterrupted))


def test_two_processes_give_the_single_process_result(files, uninterrupted, tmp_path):
    output = tmp_path / "two"
    launcher = ("accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "dmin_diffusers.cli")
    process = run_cli(cache_command(files, output), launcher=launcher)
    log, _ = process.communicate(timeout=300)
    assert process.returncode == 0, log
    assert "by 2 processes" in log, log
    parts = sorted(p.name for p in (output / "vectors").glob("*.json"))
    assert parts == ["part-000-of-002.json", "part-001-of-002.json"]
    assert torch.equal(rows_of(output), rows_of(uninterrupted))

    single, double = dm.AttributionIndex.from_pretrained(uninterrupted), dm.AttributionIndex.from_pretrained(output)
    queries = rows_of(uninterrupted)
    for row in range(NUM_ROWS):
        for exact in (True, False):
            assert single.search(queries[row], 4, exact=exact)[0] == double.search(queries[row], 4, exact=exact)[0]


def test_dreambooth_instance_folder(tmp_path):
    folder = tmp_path / "instances"
    folder.mkdir()
    for row in range(3):
        make_caption_dataset(3)[row]["image"].save(folder / f"{row}.png")
    dataset = load_training_dataset(instance_data_dir=str(folder), instance_prompt="a photo of sks dog")
    assert dataset["text"] == ["a photo of sks dog"] * 3
    assert np.asarray(dataset[1]["image"]).shape == (32, 32, 3)
    with pytest.raises(ValueError, match="instance_prompt"):
        load_training_dataset(instance_data_dir=str(folder))


# --------------------------------------------------------------- the notes for diffusers' scripts


def test_notes_for_the_diffusers_scripts_compile_and_read_their_arguments():
    readme = (Path(__file__).parent.parent / "callbacks" / "README.md").read_text()
    blocks = readme.split("```python\n")[1:]
    snippets = [block.split("```")[0] for block in blocks]
    assert len(snippets) == 7  # the generic loop and the six scripts
    for snippet in snippets:
        compile(snippet, "callbacks/README.md", "exec")
        lines = snippet.strip().splitlines()
        assert len(lines) <= 5
        loads = [n for n, line in enumerate(lines) if "from_pretrained(" in line or "load_lora_weights(" in line]
        if loads:  # files saved by the main process alone: every process waits for them before reading them
            barriers = [n for n, line in enumerate(lines) if line.startswith("accelerator.wait_for_everyone()")]
            assert barriers and barriers[0] < loads[0], snippet

    text_to_image = argparse.Namespace(  # the argument names of train_text_to_image(_lora).py
        output_dir="out", resolution=512, center_crop=False, random_flip=True, image_column="image",
        caption_column="text", dataset_name="lambdalabs/pokemon", dataset_config_name=None, train_data_dir=None,
        cache_dir=None, max_train_samples=100, seed=1337,
    )
    callback = GradientCacheCallback.from_training_args(text_to_image)
    assert callback.output_dir == os.path.join("out", "dmin-index")
    assert callback.config.resolution == 512 and callback.config.center_crop
    assert callback.config.image_interpolation_mode == "bilinear"  # an older script without the argument
    text_to_image.image_interpolation_mode = "lanczos"  # the scripts' default since they have it
    assert GradientCacheCallback.from_training_args(text_to_image).config.image_interpolation_mode == "lanczos"
    assert callback.dataset_args["max_train_samples"] == 100 and callback.dataset_args["seed"] == 1337

    dreambooth = argparse.Namespace(  # train_dreambooth_lora_sd3.py
        output_dir="out", resolution=1024, instance_data_dir="dog", instance_prompt="a photo of sks dog",
        caption_column=None, image_column="image", dataset_name=None, max_sequence_length=77, seed=0,
    )
    callback = GradientCacheCallback.from_training_args(dreambooth, config=dm.DMinConfig(num_timesteps=5))
    assert callback.dataset_args["instance_prompt"] == "a photo of sks dog" and callback.caption_column == "text"
    assert callback.config.num_timesteps == 5
    # DreamBooth scripts resize bilinearly (no --image_interpolation_mode)
    assert GradientCacheCallback.from_training_args(dreambooth).config.image_interpolation_mode == "bilinear"

    unconditional = argparse.Namespace(output_dir="ddpm-out", resolution=64, dataset_name=None,
                                       train_data_dir="flowers", dmin_num_timesteps=4)
    callback = GradientCacheCallback.from_training_args(unconditional)
    assert callback.config.num_timesteps == 4 and callback.dataset_args["train_data_dir"] == "flowers"


def script_note(script: str) -> str:
    """The code block of callbacks/README.md's note on one of diffusers' example scripts."""
    readme = (Path(__file__).parent.parent / "callbacks" / "README.md").read_text()
    return readme.split(f"`examples/{script}`", 1)[1].split("```python\n", 1)[1].split("```")[0]


@pytest.mark.parametrize("kind, script", [("sdxl", "text_to_image/train_text_to_image_lora_sdxl.py"),
                                          ("flux", "dreambooth/train_dreambooth_lora_flux.py")])
def test_the_sdxl_and_flux_notes_run_as_written(kind, script, tmp_path):
    """The note's lines, run with what the script holds at that point: its args, accelerator, weight dtype, VAE and
    training dataset, a base pipeline saved to disk and the LoRA the run saved to output_dir."""
    from accelerate import PartialState
    from diffusers import AutoencoderKL, FluxPipeline, StableDiffusionXLPipeline

    extra = {"guidance_embeds": True} if kind == "flux" else {}
    tiny_pipeline(kind, **extra).save_pretrained(tmp_path / "base")
    trained = tiny_pipeline(kind, lora_rank=4, **extra)
    denoiser_name = "transformer" if kind == "flux" else "unet"
    layers = get_peft_model_state_dict(getattr(trained, denoiser_name))
    type(trained).save_lora_weights(tmp_path / "out", **{f"{denoiser_name}_lora_layers": layers})
    rows = make_caption_dataset(4)
    common = dict(pretrained_model_name_or_path=str(tmp_path / "base"), revision=None, variant=None,
                  output_dir=str(tmp_path / "out"), resolution=32, seed=0, image_column="image", dataset_name=None,
                  dmin_num_timesteps=2, dmin_projection_dim=256)
    if kind == "sdxl":  # train_text_to_image_lora_sdxl.py's arguments; train_dataset is its datasets.Dataset
        args = argparse.Namespace(**common, caption_column="text", center_crop=False, random_flip=True,
                                  dataset_config_name=None, train_data_dir=None, cache_dir=None, max_train_samples=None,
                                  image_interpolation_mode="lanczos")
        prompts = list(rows["text"])
    else:  # train_dreambooth_lora_flux.py's: the rows come from the instance images and prompt
        (tmp_path / "instances").mkdir()
        for number, row in enumerate(rows):
            row["image"].save(tmp_path / "instances" / f"{number}.png")
        args = argparse.Namespace(**common, caption_column=None, instance_data_dir=str(tmp_path / "instances"),
                                  instance_prompt="a photo of sks shape", max_sequence_length=512, guidance_scale=3.5)
        prompts = ["a photo of sks shape"] * len(rows)
    scope = {"args": args, "accelerator": PartialState(cpu=True), "weight_dtype": torch.float32, "train_dataset": rows,
             "vae": AutoencoderKL.from_pretrained(tmp_path / "base" / "vae"),
             "StableDiffusionXLPipeline": StableDiffusionXLPipeline, "FluxPipeline": FluxPipeline}
    exec(compile(script_note(script), "callbacks/README.md", "exec"), scope)

    pipeline = scope["pipeline"]
    index = pipeline.attribution_index
    assert index.directory == tmp_path / "out" / "dmin-index" and index.num_rows == len(rows)
    assert index.config.family == kind and index.config.guidance_scale == (3.5 if kind == "flux" else None)
    # the same vectors as caching the trained pipeline in memory with the script's settings
    direct = dm.enable_attribution(trained).build_attribution_index(
        index.dataset, tmp_path / "direct", config=GradientCacheCallback.from_training_args(args).config,
        progress=False,
    )
    # a reloaded pipeline is another instance: equal to float16 rounding, not bitwise (CPUs differ in the last bits)
    torch.testing.assert_close(direct.store.get_rows(list(range(4))), index.store.get_rows(list(range(4))),
                               rtol=2e-3, atol=1e-5)
    results = pipeline.attribute(list(rows["image"]), prompts, top_k=1, exact=True)
    if kind == "sdxl":  # rows with their own captions retrieve themselves (with one prompt for every row, the
        # image-specific part of a tiny random model's gradients is too small to rank on)
        assert [result.indices for result in results] == [[0], [1], [2], [3]]


@pytest.mark.parametrize("kind", ["sdxl", "flux"])
def test_cli_caches_and_attributes_sdxl_and_flux(kind, tmp_path, capsys):
    extra = {"guidance_embeds": True} if kind == "flux" else {}
    base = tiny_pipeline(kind, **extra)
    base.save_pretrained(tmp_path / "base")
    denoiser_name = "transformer" if kind == "flux" else "unet"
    add_lora(getattr(base, denoiser_name), rank=4, seed=3)
    layers = get_peft_model_state_dict(getattr(base, denoiser_name))
    type(base).save_lora_weights(tmp_path / "lora", **{f"{denoiser_name}_lora_layers": layers})
    data = write_imagefolder(tmp_path / "data")
    model = ["--pretrained_model_name_or_path", str(tmp_path / "base"), "--lora_weights", str(tmp_path / "lora")]
    flux_only = ["--guidance_scale", "2.0", "--max_sequence_length", "64"] if kind == "flux" else []
    assert dmin_main(["cache", *model, "--train_data_dir", str(data), "--index_dir", str(tmp_path / "index"),
                      "--num_timesteps", "3", "--projection_dim", "512", "--resolution", "32", *flux_only]) == 0
    config = dm.AttributionIndex.from_pretrained(tmp_path / "index").config
    assert config.family == kind and config.resolution == 32
    assert (config.guidance_scale, config.max_sequence_length) == ((2.0, 64) if kind == "flux" else (None, None))
    capsys.readouterr()
    for row in (1, 6):
        assert dmin_main(["attribute", *model, "--index", str(tmp_path / "index"), "--image",
                          str(data / f"row_{row:03d}.png"), "--prompt", make_caption_dataset(NUM_ROWS)[row]["text"],
                          "--top_k", "2"]) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [line["rank"] for line in lines] == [1, 2] and lines[0]["row"] == row
