"""Quickstart: train a tiny digit diffusion model, then ask which training images made each sample.

What this script does, end to end, on the CPU and without downloading anything:

1. Loads scikit-learn's ``load_digits`` (1,797 handwritten 8x8 digits that ship with
   scikit-learn) into a Hugging Face ``datasets.Dataset`` with an ``"image"`` column
   (16x16 grayscale PIL images) and a ``"label"`` column.
2. Trains a small diffusers ``UNet2DModel`` with a ``DDPMScheduler`` on those images with
   the usual diffusers recipe (AdamW, MSE on the added noise, random timesteps) and saves
   the pipeline to ``--output_dir`` with ``save_pretrained`` (and the training rows to
   ``<output_dir>/train-dataset`` with ``save_to_disk``, for the attribution page).
3. Generates a few digits with a ``DDPMPipeline`` and saves them as ``generated.png``.
4. Reads each generated digit with a simple classifier trained on the real 8x8 digits.
5. Builds a DMin attribution index over the training set and, for every generated digit,
   retrieves the top-k most influential training images. It saves an
   ``attribution-{i}.png`` grid per digit and reports how often the retrieved training
   images carry the same label as the generated digit (compared with the chance rate).

Runtime on an otherwise idle 2-core CPU: about 2 minutes of training (1,000 steps of 64
images), a few seconds of generation, about 1.5 minutes to build the attribution index
(a gradient per training image and timestep, 120 at a time) and a second to attribute;
the script prints the time of every phase. ``--quick`` trains for ~30 seconds on 200 digits (its samples are
blobs, not clean digits) as a smoke run; ``--skip_attribution`` stops after step 4. If
other busy processes share the cores, PyTorch's threads wait on each other and training
can slow down many times over; ``OMP_NUM_THREADS=1`` then helps.

    python examples/quickstart.py
    python examples/quickstart.py --quick
    python examples/quickstart.py --skip_attribution

Then look at the attributions on a page (``pip install -e ".[app]"``; ``APP_COMMAND`` below).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset, Features, Image, Value
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.utils import make_image_grid
from PIL import Image as PILImage
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from tqdm.auto import tqdm

IMAGE_SIZE = 16
DIGITS_MAX = 16.0  # load_digits pixel values run from 0 to 16
DEFAULT_TRAIN_STEPS = 1000
QUICK_TRAIN_STEPS = 150
QUICK_NUM_TRAIN_ROWS = 200


def parse_args() -> argparse.Namespace:
    """Parse the command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", type=Path, default=Path("quickstart-output"))
    parser.add_argument(
        "--num_train_rows",
        type=int,
        default=None,
        help=f"training rows, picked with --seed (default: all 1,797; {QUICK_NUM_TRAIN_ROWS} with --quick)",
    )
    parser.add_argument(
        "--train_steps",
        type=int,
        default=None,
        help=f"optimizer steps (default: {DEFAULT_TRAIN_STEPS}, about 2 minutes; "
        f"{QUICK_TRAIN_STEPS} with --quick)",
    )
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--num_images", type=int, default=6, help="digits to generate")
    parser.add_argument("--num_inference_steps", type=int, default=250)
    parser.add_argument("--top_k", type=int, default=10, help="training images retrieved per digit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="short smoke run (~30 s of training)")
    parser.add_argument("--skip_attribution", action="store_true", help="stop before the DMin attribution")
    args = parser.parse_args()
    if args.train_steps is None:
        args.train_steps = QUICK_TRAIN_STEPS if args.quick else DEFAULT_TRAIN_STEPS
    if args.num_train_rows is None and args.quick:
        args.num_train_rows = QUICK_NUM_TRAIN_ROWS
    return args


@contextlib.contextmanager
def timed(phase: str, timings: dict[str, float]) -> Iterator[None]:
    """Record the wall-clock seconds spent inside the block under ``timings[phase]``."""
    start = time.perf_counter()
    yield
    timings[phase] = time.perf_counter() - start


def digits_to_pil(pixels: np.ndarray) -> PILImage.Image:
    """Turn one 8x8 ``load_digits`` array (values 0..16) into a smooth 16x16 grayscale image."""
    gray = np.round(pixels.reshape(8, 8) * (255.0 / DIGITS_MAX)).astype(np.uint8)
    return PILImage.fromarray(gray, mode="L").resize((IMAGE_SIZE, IMAGE_SIZE), PILImage.BICUBIC)


def pil_to_digits(image: PILImage.Image) -> np.ndarray:
    """Turn a 16x16 image back into the 64 ``load_digits`` features (8x8, values 0..16)."""
    small = image.convert("L").resize((8, 8), PILImage.BOX)
    return np.asarray(small, dtype=np.float64).reshape(64) * (DIGITS_MAX / 255.0)


def load_digits_dataset(num_rows: int | None, seed: int) -> Dataset:
    """Load scikit-learn's digits as a ``datasets.Dataset`` with "image" and "label" columns."""
    digits = load_digits()
    rows = np.arange(len(digits.target))
    if num_rows is not None and num_rows < len(rows):
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=num_rows, replace=False))
    features = Features({"image": Image(), "label": Value("int64")})
    return Dataset.from_dict(
        {
            "image": [digits_to_pil(digits.data[i]) for i in rows],
            "label": [int(digits.target[i]) for i in rows],
        },
        features=features,
    )


def dataset_to_tensor(dataset: Dataset) -> torch.Tensor:
    """Stack the dataset's images into one (N, 1, 16, 16) float tensor scaled to [-1, 1]."""
    pixels = np.stack([np.asarray(image.convert("L"), dtype=np.float32) for image in dataset["image"]])
    return torch.from_numpy(pixels).unsqueeze(1) / 127.5 - 1.0


def make_unet() -> UNet2DModel:
    """A ~0.7M-parameter UNet: 16x16 -> 8x8 -> 4x4, with self-attention at 4x4."""
    return UNet2DModel(
        sample_size=IMAGE_SIZE,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(16, 32, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )


def shuffled_batches(num_rows: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Yield row-index batches forever, reshuffling at every epoch."""
    while True:
        order = torch.randperm(num_rows, generator=generator)
        for start in range(0, num_rows - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def train_unet(
    images: torch.Tensor,
    scheduler: DDPMScheduler,
    train_steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
) -> UNet2DModel:
    """Train a fresh UNet to predict the noise added to ``images`` at random timesteps."""
    torch.manual_seed(seed)
    unet = make_unet()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=learning_rate)
    lr_schedule = get_cosine_schedule_with_warmup(
        optimizer, num_warmup_steps=train_steps // 20, num_training_steps=train_steps
    )
    generator = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, len(images))
    batches = shuffled_batches(len(images), batch_size, generator)

    unet.train()
    progress = tqdm(range(train_steps), desc="train")
    for _ in progress:
        clean = images[next(batches)]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(clean),), generator=generator)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        loss = F.mse_loss(unet(noisy, timesteps).sample, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad()
        progress.set_postfix(loss=f"{loss.item():.4f}")
    unet.eval()
    return unet


def generate_digits(
    unet: UNet2DModel, scheduler: DDPMScheduler, num_images: int, num_inference_steps: int, seed: int
) -> list[PILImage.Image]:
    """Sample ``num_images`` digits from the trained model."""
    # A fresh scheduler copy: the pipeline's set_timesteps() would otherwise change the training one.
    pipeline = DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(scheduler.config))
    generator = torch.Generator().manual_seed(seed)
    result = pipeline(
        batch_size=num_images, generator=generator, num_inference_steps=num_inference_steps, output_type="pil"
    )
    return result.images


def train_digit_classifier(seed: int) -> tuple[LogisticRegression, float]:
    """Fit a logistic-regression digit reader on real 8x8 digits; return it and its held-out accuracy."""
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=0.25, random_state=seed, stratify=digits.target
    )
    classifier = LogisticRegression(max_iter=5000)
    classifier.fit(x_train, y_train)
    return classifier, float(classifier.score(x_test, y_test))


def read_digits(
    classifier: LogisticRegression, images: list[PILImage.Image]
) -> tuple[list[int], list[float]]:
    """Return the classifier's label and its probability for each 16x16 image."""
    features = np.stack([pil_to_digits(image) for image in images])
    probabilities = classifier.predict_proba(features)
    best = probabilities.argmax(axis=1)
    labels = [int(classifier.classes_[i]) for i in best]
    return labels, [float(p[i]) for p, i in zip(probabilities, best)]


def enlarged_grid(images: list[PILImage.Image], scale: int = 8) -> PILImage.Image:
    """One row of the images, enlarged with hard pixel edges so 16x16 digits are viewable."""
    size = IMAGE_SIZE * scale
    enlarged = [image.resize((size, size), PILImage.NEAREST) for image in images]
    return make_image_grid(enlarged, rows=1, cols=len(enlarged))


def attribute_generated(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    train_dataset: Dataset,
    images: list[PILImage.Image],
    labels: list[int],
    output_dir: Path,
    top_k: int,
    seed: int,
    timings: dict[str, float],
) -> None:
    """Find the top-k most influential training images of each generated digit with DMin.

    Saves ``attribution-{i}.png`` per digit and prints how often the retrieved training
    images share the digit's (classifier-read) label, next to the chance rate. The index
    and attribution phases are timed into ``timings``.
    """
    import dmin_diffusers as dm  # imported here so --skip_attribution runs without the library

    pipe = dm.DMinDDPMPipeline(unet=unet, scheduler=scheduler)
    index_dir = output_dir / "attribution-index"
    # The model was just retrained: the library would rightly refuse to resume an earlier run's index.
    shutil.rmtree(index_dir, ignore_errors=True)
    with timed("index", timings):
        pipe.build_attribution_index(
            train_dataset,
            index_dir,
            config=dm.DMinConfig(num_timesteps=10, projection_dim=4096, seed=seed),
            image_column="image",
        )

    train_labels = np.asarray(train_dataset["label"])
    match_rates, chance_rates = [], []
    with timed("attribute", timings):
        results = pipe.attribute(images, top_k=top_k)  # a list of images: one result each, in batched passes
        for i, (result, label) in enumerate(zip(results, labels)):
            result.to_image().save(output_dir / f"attribution-{i}.png")
            top_labels = train_labels[result.indices]  # result.indices are row numbers of train_dataset
            match_rates.append(float(np.mean(top_labels == label)))
            chance_rates.append(float(np.mean(train_labels == label)))
            print(
                f"image {i}: reads as {label}; top-{top_k} labels {top_labels.tolist()} "
                f"match {match_rates[-1]:.0%} (chance {chance_rates[-1]:.0%}); "
                f"top rows {result.indices[:3]} scores {[round(s, 4) for s in result.scores[:3]]}"
            )

    print(
        f"top-{top_k} label match rate: {np.mean(match_rates):.1%} "
        f"(chance rate: {np.mean(chance_rates):.1%})"
    )


#: opens the attribution page on this script's pipeline, index and training rows
APP_COMMAND = (
    "dmin app --pretrained_model_name_or_path {out} --index {out}/attribution-index "
    "--dataset_name {out}/train-dataset --num_inference_steps 250"
)


def main() -> None:
    """Run the quickstart: data, training, generation, digit reading and attribution."""
    args = parse_args()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    train_dataset = load_digits_dataset(args.num_train_rows, args.seed)
    print(f"training set: {len(train_dataset)} digits, {IMAGE_SIZE}x{IMAGE_SIZE} grayscale")

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    with timed("train", timings):
        unet = train_unet(
            dataset_to_tensor(train_dataset),
            scheduler,
            args.train_steps,
            args.batch_size,
            args.learning_rate,
            args.seed,
        )
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(args.output_dir)
    train_dataset.save_to_disk(str(args.output_dir / "train-dataset"))
    print(f"saved the trained pipeline to {args.output_dir}/ and its training rows to {args.output_dir}/train-dataset")

    with timed("generate", timings):
        images = generate_digits(unet, scheduler, args.num_images, args.num_inference_steps, args.seed)
    enlarged_grid(images).save(args.output_dir / "generated.png")

    classifier, accuracy = train_digit_classifier(args.seed)
    labels, confidences = read_digits(classifier, images)
    print(f"digit classifier: {accuracy:.1%} accuracy on held-out real digits")
    for i, (label, confidence) in enumerate(zip(labels, confidences)):
        print(f"generated image {i}: reads as {label} (p={confidence:.2f})")
    print(f"saved the generated digits to {args.output_dir / 'generated.png'}")

    if not args.skip_attribution:
        attribute_generated(
            unet, scheduler, train_dataset, images, labels, args.output_dir, args.top_k, args.seed, timings
        )

    print("runtime: " + ", ".join(f"{phase} {seconds:.1f}s" for phase, seconds in timings.items()))
    if not args.skip_attribution:
        print("look at the attributions on a page (pip install -e \".[app]\"):\n  " + APP_COMMAND.format(out=args.output_dir))


if __name__ == "__main__":
    main()
