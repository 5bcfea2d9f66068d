"""What re-scoring a setting of the LDS benchmark needs, rebuilt from the committed data alone (no retraining): the
full model, its training rows and queries as model inputs, the baselines' similarities, the subset masks and the
retrained losses."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler
from PIL import Image
from safetensors.torch import load_file

import dmin_diffusers as dm
from dmin_diffusers.families import detect_family
from dmin_diffusers.gradients import PreparedExample
from dmin_diffusers.inputs import preprocess_image
from lds_retrain import RetrainSizes, load_t2i_lora
from quality_data import load_digit_rows, make_t2i_dataset
from quality_setups import cosine, make_digit_unet, preparer, sd_prompt


@dataclass
class LdsData:
    """One setting's model, rows, queries (both sets in one list), and retraining results."""

    setting: str
    pipe: object
    rows: list[PreparedExample]
    queries: list[PreparedExample]
    query_sets: dict[str, list[int]]  # name -> positions in ``queries``
    query_labels: list
    row_labels: np.ndarray
    baselines: dict[str, np.ndarray]  # name -> (Q, N) similarity
    masks: np.ndarray  # (M, N) of the subsets every seed finished
    losses: np.ndarray  # (S, M, Q)
    setup: dict
    notes: list[str] = field(default_factory=list)


def sizes_of(setup: dict) -> RetrainSizes:
    return RetrainSizes(**setup["sizes"])


def finished(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """The masks and (S, M, Q) losses of the subsets whose every training seed is done (in ``losses.safetensors``
    or in the file of a second, reverse-order process not merged yet)."""
    masks = load_file(str(directory / "masks.safetensors"))["masks"].numpy()
    saved = load_file(str(directory / "losses.safetensors"))
    losses, done = saved["losses"].numpy(), saved["done"].numpy().astype(bool)
    if (directory / "losses-reverse.safetensors").exists():
        other = load_file(str(directory / "losses-reverse.safetensors"))
        take = other["done"].numpy().astype(bool) & ~done
        losses = np.where(take[:, :, None], other["losses"].numpy(), losses)
        done |= take
    complete = done.all(axis=0)
    return masks[complete], losses[:, complete]


def load_digits(directory: Path, setup: dict) -> tuple:
    sizes = sizes_of(setup)
    pixels = torch.from_numpy(load_digit_rows(sizes.rows, 0)[0])
    unet = make_digit_unet(0)
    unet.load_state_dict(load_file(str(directory / "model.safetensors")))
    pipe = dm.DMinDDPMPipeline(unet=unet.eval(), scheduler=DDPMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    query_pixels = load_file(str(directory / "queries.safetensors"))["pixels"]
    rows = [PreparedExample(latents=x[None], conditioning={}) for x in pixels]
    queries = [PreparedExample(latents=x[None], conditioning={}) for x in query_pixels]
    baselines = {"pixel cosine": cosine(query_pixels, pixels).numpy()}
    return pipe, rows, queries, baselines, []


def load_t2i(directory: Path, setup: dict) -> tuple:
    sizes = sizes_of(setup)
    pipe = load_t2i_lora(directory, sizes)
    dataset = make_t2i_dataset(sizes.rows, 0)
    prep = preparer(pipe)
    resolution = prep.config.resolution
    rows = [prep.prepare(r["image"], r["text"]) for r in dataset]
    saved = load_file(str(directory / "queries.safetensors"))
    images = [Image.fromarray(a) for a in saved["images"].numpy()]
    queries = [prep.prepare(image, prompt) for image, prompt in zip(images, setup["query_prompts"])]
    latents = torch.cat([q.latents for q in queries])
    drift = float((latents - saved["latents"]).abs().max())
    row_pixels = torch.cat([preprocess_image(im, resolution) for im in dataset["image"]])
    query_pixels = torch.cat([preprocess_image(im, resolution) for im in images])
    baselines = {"pixel cosine": cosine(query_pixels, row_pixels).numpy(),
                 "latent cosine": cosine(latents, torch.cat([r.latents for r in rows])).numpy()}
    family = detect_family(pipe)
    check = sd_prompt(family, setup["query_prompts"][0])["encoder_hidden_states"]
    assert torch.allclose(check, queries[0].conditioning["encoder_hidden_states"], atol=1e-5)
    return pipe, rows, queries, baselines, [f"query latents re-encoded from the saved images differ from the "
                                           f"retraining's by at most {drift:.2e}"]


def load_setting(setting: str, directory: Path) -> LdsData:
    """Everything re-scoring ``setting`` needs, from ``directory`` (``benchmarks/results/lds/<setting>``)."""
    setup = json.loads((directory / "setup.json").read_text())
    loader = load_digits if setting == "digits" else load_t2i
    pipe, rows, queries, baselines, notes = loader(directory, setup)
    masks, losses = finished(directory)
    query_sets = {name: list(range(*bounds)) for name, bounds in setup["query_sets"].items()}
    return LdsData(setting, pipe, rows, queries, query_sets, setup["query_labels"], np.asarray(setup["row_labels"]),
                   baselines, masks, losses, setup, notes)


def restrict_queries(data: LdsData, per_set: int) -> LdsData:
    """The same data with only the first ``per_set`` queries of each set (``--quick``)."""
    keep = [i for positions in data.query_sets.values() for i in positions[:per_set]]
    bounds, start = {}, 0
    for name, positions in data.query_sets.items():
        count = min(per_set, len(positions))
        bounds[name] = list(range(start, start + count))
        start += count
    return LdsData(data.setting, data.pipe, data.rows, [data.queries[i] for i in keep], bounds,
                   [data.query_labels[i] for i in keep], data.row_labels,
                   {k: v[keep] for k, v in data.baselines.items()}, data.masks, data.losses[:, :, keep], data.setup,
                   data.notes)


