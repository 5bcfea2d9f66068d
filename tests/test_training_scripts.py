"""Issue 18: the notes of callbacks/README.md in real training runs of diffusers' example scripts: the cache sees the
pixels the script trained on, and a re-run into the same output directory replaces the stale index."""

import argparse
import logging
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from accelerate import PartialState
from diffusers import AutoencoderKL, DiffusionPipeline, StableDiffusionPipeline
from peft import get_peft_model_state_dict

import dmin_diffusers as dm
from dmin_diffusers.config import INTERPOLATION_MODES
from dmin_diffusers.inputs import preprocess_image
from tiny_models import tiny_pipeline

RESOLUTION = 32
#: torchvision's ``pil_modes_mapping``: the PIL filter ``transforms.Resize`` gives a PIL image for each
#: ``InterpolationMode`` (the training scripts' ``--image_interpolation_mode`` choices)
TORCHVISION_PIL_FILTERS = {"nearest": 0, "nearest_exact": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4,
                           "hamming": 5}


def script_note(script: str) -> str:
    """The code block of callbacks/README.md's note on one of diffusers' example scripts."""
    readme = (Path(__file__).parent.parent / "callbacks" / "README.md").read_text()
    return readme.split(f"`examples/{script}`", 1)[1].split("```python\n", 1)[1].split("```")[0]


def script_train_transforms(args):
    """train_text_to_image_lora.py's ``train_transforms``, reproduced with PIL (torchvision does not import beside
    this torch build): ``Resize(resolution, interpolation=InterpolationMode[mode.upper()])``, ``CenterCrop`` (with
    ``--center_crop``), no flip (without ``--random_flip``), ``ToTensor()``, ``Normalize([0.5], [0.5])``."""
    assert args.center_crop and not args.random_flip

    def transform(image: PIL.Image.Image) -> torch.Tensor:
        width, height = image.size
        short, long = min(width, height), max(width, height)
        new_short, new_long = args.resolution, int(args.resolution * long / short)  # Resize(int): the short side
        new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
        if (new_width, new_height) != (width, height):
            image = image.resize((new_width, new_height), TORCHVISION_PIL_FILTERS[args.image_interpolation_mode])
        top = int(round((new_height - args.resolution) / 2.0))  # CenterCrop
        left = int(round((new_width - args.resolution) / 2.0))
        image = image.crop((left, top, left + args.resolution, top + args.resolution))
        tensor = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float() / 255  # ToTensor
        return (tensor - 0.5) / 0.5  # Normalize([0.5], [0.5])

    return transform


def non_square_rows(count: int = 2) -> datasets.Dataset:
    """Rows of 40 x 56 pixels (width x height) of seeded noise: every resize filter gives other pixels."""
    generator = np.random.default_rng(0)
    images = [PIL.Image.fromarray(generator.integers(0, 256, (56, 40, 3), dtype=np.uint8)) for _ in range(count)]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": images, "text": [f"noise {n}" for n in range(count)]}, features)


def text_to_image_lora_args(tmp_path: Path, **changes) -> argparse.Namespace:
    """train_text_to_image_lora.py's arguments (its defaults, and the ones a run here sets)."""
    values = dict(
        pretrained_model_name_or_path=str(tmp_path / "base"), revision=None, variant=None,
        output_dir=str(tmp_path / "out"), resolution=RESOLUTION, center_crop=True, random_flip=False,
        image_interpolation_mode="lanczos", image_column="image", caption_column="text", dataset_name=None,
        dataset_config_name=None, train_data_dir=None, cache_dir=None, max_train_samples=None, seed=0,
        train_batch_size=1, learning_rate=1e-4, rank=4, dmin_num_timesteps=2, dmin_projection_dim=256,
    )
    values.update(changes)
    return argparse.Namespace(**values)


def save_trained_lora(directory: Path, seed: int) -> None:
    """What the script's saving block leaves in ``--output_dir``: the trained LoRA (``seed`` stands for a run)."""
    trained = tiny_pipeline("stable-diffusion", lora_rank=4, seed=seed)
    StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=get_peft_model_state_dict(trained.unet))


def run_note(args, train_dataset):
    """Executes the train_text_to_image_lora.py note with what the script holds at its end."""
    scope = {"args": args, "accelerator": PartialState(cpu=True), "weight_dtype": torch.float32,
             "train_dataset": train_dataset, "DiffusionPipeline": DiffusionPipeline}
    exec(compile(script_note("text_to_image/train_text_to_image_lora.py"), "callbacks/README.md", "exec"), scope)
    return scope["pipeline"]


@pytest.mark.parametrize("mode", sorted(TORCHVISION_PIL_FILTERS))
def test_every_interpolation_mode_resizes_as_the_scripts_do(mode):
    """``preprocess_image`` with each of the scripts' ``--image_interpolation_mode`` choices gives their pixels."""
    args = argparse.Namespace(resolution=RESOLUTION, center_crop=True, random_flip=False, image_interpolation_mode=mode)
    for image in non_square_rows()["image"]:
        expected = script_train_transforms(args)(image.convert("RGB"))
        torch.testing.assert_close(preprocess_image(image, RESOLUTION, interpolation=mode)[0], expected, rtol=0,
                                   atol=1e-6)
    assert set(TORCHVISION_PIL_FILTERS) == set(INTERPOLATION_MODES)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    tiny_pipeline("stable-diffusion").save_pretrained(root / "base")
    return root / "base"


@pytest.mark.parametrize("mode", ["lanczos", "bicubic"])
def test_the_text_to_image_lora_note_caches_the_scripts_training_input(mode, base, tmp_path, monkeypatch):
    """The pixels the cache gives the VAE for a non-square row are the script's own training input (center crop,
    no flip), for its default filter and another one (before: always bilinear, 0.23 off in [-1, 1])."""
    args = text_to_image_lora_args(tmp_path, pretrained_model_name_or_path=str(base), image_interpolation_mode=mode)
    save_trained_lora(Path(args.output_dir), seed=1)
    transform = script_train_transforms(args)

    def preprocess_train(examples):  # the script's, less the tokenizer
        examples["pixel_values"] = [transform(image.convert("RGB")) for image in examples[args.image_column]]
        return examples

    train_dataset = non_square_rows().with_transform(preprocess_train)
    encoded = []
    encode = AutoencoderKL.encode

    def recording_encode(self, pixels, *rest, **options):
        encoded.append(pixels.detach().clone())
        return encode(self, pixels, *rest, **options)

    monkeypatch.setattr(AutoencoderKL, "encode", recording_encode)
    pipeline = run_note(args, train_dataset)

    assert pipeline.attribution_index.config.image_interpolation_mode == mode
    assert len(encoded) == len(train_dataset)
    for row, pixels in enumerate(encoded):
        assert pixels.shape == (1, 3, RESOLUTION, RESOLUTION)
        torch.testing.assert_close(pixels[0], train_dataset[row]["pixel_values"], rtol=0, atol=1e-6)


def test_a_training_rerun_into_the_same_output_dir_replaces_the_stale_index(base, tmp_path, caplog):
    """A second run (more steps) into the same --output_dir: its note replaces the first run's index, says so,
    and leaves the new LoRA beside an index of the new weights (before: refused after training, "other settings")."""
    args = text_to_image_lora_args(tmp_path, pretrained_model_name_or_path=str(base))
    rows = non_square_rows()
    save_trained_lora(Path(args.output_dir), seed=1)
    first = run_note(args, rows).attribution_index.store.get_rows([0, 1])

    save_trained_lora(Path(args.output_dir), seed=2)  # the re-run's saving block overwrites the LoRA
    lora = (Path(args.output_dir) / "pytorch_lora_weights.safetensors").read_bytes()
    with caplog.at_level(logging.WARNING):
        run_note(args, rows)
    assert any(record.levelno == logging.WARNING and "dmin-index" in record.getMessage()
               for record in caplog.records), [record.getMessage() for record in caplog.records]
    index = dm.AttributionIndex.from_pretrained(Path(args.output_dir) / "dmin-index", dataset=rows, verify=True)
    assert index.num_rows == len(rows) and not torch.equal(index.store.get_rows([0, 1]), first)
    assert (Path(args.output_dir) / "pytorch_lora_weights.safetensors").read_bytes() == lora

    save_trained_lora(tmp_path / "fresh", seed=2)  # the same second run into an empty directory
    fresh = run_note(text_to_image_lora_args(tmp_path, pretrained_model_name_or_path=str(base),
                                             output_dir=str(tmp_path / "fresh")), rows)
    torch.testing.assert_close(index.store.get_rows([0, 1]), fresh.attribution_index.store.get_rows([0, 1]),
                               rtol=2e-3, atol=1e-5)  # another pipeline instance: equal to float16 rounding
