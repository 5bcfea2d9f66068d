"""The `dmin` command: cache a training set after training, attribute an image, push an index to the Hub.

```
accelerate launch -m dmin_diffusers.cli cache --pretrained_model_name_or_path ... --output_dir my-index ...
dmin attribute --index my-index --pretrained_model_name_or_path ... --image gen.png --prompt "..." --top_k 10
dmin app --index my-index --pretrained_model_name_or_path ... --dataset_name ...   # a page (Gradio)
dmin push --index my-index --repo_id user/name
```
Argument names follow diffusers' training scripts so that their values can be reused as they are.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Sequence

import torch
from huggingface_hub.errors import HfHubHTTPError

from .caching import DEFAULT_CAPTION_COLUMN, DEFAULT_IMAGE_COLUMN, cache_dataset
from .config import KNN_PROJECTIONS, NOISE_MODES, OUTPUT_FUNCTIONS, STORAGE_DTYPES, TIMESTEP_SPACINGS, DMinConfig
from .gradients import DEFAULT_BATCH_BYTES
from .index import AttributionIndex
from .mixin import DEFAULT_TOP_K, enable_attribution

DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="base pipeline (path or Hub id)")
    parser.add_argument("--revision", default=None, help="revision of the base pipeline")
    parser.add_argument("--variant", default=None, help="weights variant of the base pipeline, e.g. fp16")
    parser.add_argument("--lora_weights", default=None, help="LoRA weights (the training run's output_dir)")
    parser.add_argument("--mixed_precision", choices=sorted(DTYPES), default="no", help="dtype of the weights")
    parser.add_argument("--device", default=None, help="device (default: cuda if available, else cpu)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dmin", description="DMin training-data attribution for diffusers")
    commands = parser.add_subparsers(dest="command", required=True)

    cache = commands.add_parser("cache", help="cache the compressed gradients of a training set")
    _add_pipeline_arguments(cache)
    cache.add_argument("--dataset_name", default=None)
    cache.add_argument("--dataset_config_name", default=None)
    cache.add_argument("--dataset_revision", default=None)
    cache.add_argument("--train_data_dir", default=None, help="an imagefolder (captions in metadata.jsonl)")
    cache.add_argument("--instance_data_dir", default=None, help="DreamBooth instance images")
    cache.add_argument("--instance_prompt", default=None)
    cache.add_argument("--cache_dir", default=None)
    cache.add_argument("--image_column", default=DEFAULT_IMAGE_COLUMN)
    cache.add_argument("--caption_column", default=DEFAULT_CAPTION_COLUMN)
    cache.add_argument("--resolution", type=int, default=None)
    cache.add_argument("--center_crop", action="store_true", help="accepted for compatibility: caching always center-crops")
    cache.add_argument("--random_flip", action="store_true", help="accepted for compatibility: caching never flips")
    cache.add_argument("--max_train_samples", type=int, default=None)
    cache.add_argument("--seed", type=int, default=None, help="the training seed (selects max_train_samples rows)")
    cache.add_argument("--output_dir", required=True, help="directory of the attribution index")
    # DMin settings: None leaves DMinConfig's default, so the defaults live in one place
    cache.add_argument("--num_timesteps", type=int, default=None)
    cache.add_argument("--projection_dim", type=int, default=None)
    cache.add_argument("--knn_dim", type=int, default=None, help="HNSW values per timestep (default 64)")
    cache.add_argument("--knn_projection", default=None, choices=list(KNN_PROJECTIONS),
                       help="how rows become HNSW vectors (default pca)")
    cache.add_argument("--max_sequence_length", type=int, default=None,
                       help="T5 prompt length (SD3, Flux; default: that of the family's training scripts)")
    cache.add_argument("--guidance_scale", type=float, default=None,
                       help="guidance given to a transformer with a guidance embedding (Flux.1 dev; default 3.5)")
    cache.add_argument("--dmin_seed", type=int, default=None, help="seed of the fixed noise and the compressor")
    cache.add_argument("--storage_dtype", default=None, choices=list(STORAGE_DTYPES))
    cache.add_argument("--tracked_parameters", nargs="*", default=None, help="fnmatch patterns of parameter names")
    cache.add_argument("--shard_size", type=int, default=None)
    cache.add_argument("--output_function", default=None, choices=list(OUTPUT_FUNCTIONS),
                       help="what the gradient is taken of (DMinConfig.output_function)")
    cache.add_argument("--timestep_spacing", default=None, choices=list(TIMESTEP_SPACINGS))
    cache.add_argument("--noise", default=None, choices=list(NOISE_MODES))
    cache.add_argument("--noise_draws", type=int, default=None)
    cache.add_argument("--batch_memory_mb", type=float, default=DEFAULT_BATCH_BYTES / 2**20,
                       help="memory budget of one batched backward (per-sample gradients and activations; "
                       "default %(default)g; 0: one (row, timestep) at a time)")
    cache.add_argument("--paper_recipe", action="store_true",
                       help="the DMin paper's exact recipe (DMinConfig.paper()) instead of the measured default")

    attribute = commands.add_parser("attribute", help="the most influential training rows of an image")
    _add_pipeline_arguments(attribute)
    attribute.add_argument("--index", required=True, help="attribution index (directory or Hub id)")
    attribute.add_argument("--image", required=True)
    attribute.add_argument("--prompt", default=None)
    attribute.add_argument("--top_k", type=int, default=DEFAULT_TOP_K)
    attribute.add_argument("--exact", action="store_true", help="score every row instead of HNSW")
    attribute.add_argument("--no_strict", action="store_true", help="allow an index of another model (warns)")

    app = commands.add_parser("app", help='a page to look at attributions (pip install "dmin-diffusers[app]")')
    _add_pipeline_arguments(app)
    app.add_argument("--index", required=True, help="attribution index (directory or Hub id)")
    app.add_argument("--dataset_name", default=None,
                     help="the training rows: a Hub dataset, or a directory written by Dataset.save_to_disk "
                     "(default: the Hub dataset the index records, if any)")
    app.add_argument("--dataset_config_name", default=None)
    app.add_argument("--train_data_dir", default=None, help="an imagefolder of the training rows")
    app.add_argument("--top_k", type=int, default=DEFAULT_TOP_K)
    app.add_argument("--num_inference_steps", type=int, default=30, help="the page's default generation steps")
    app.add_argument("--host", default="127.0.0.1", help="address to serve the page on")
    app.add_argument("--port", type=int, default=7860)
    app.add_argument("--no_strict", action="store_true", help="allow an index of another model (warns)")

    push = commands.add_parser("push", help="upload an attribution index to the Hugging Face Hub")
    push.add_argument("--index", required=True)
    push.add_argument("--repo_id", required=True)
    push.add_argument("--private", action="store_true")
    push.add_argument("--token", default=None)
    push.add_argument("--branch", "--revision", dest="branch", default=None, help="branch to push to")
    push.add_argument("--create_pr", action="store_true", help="open a pull request instead of committing")
    push.add_argument("--repo_type", default="dataset")
    return parser


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def _could_be_hub_id(value: str) -> bool:
    """Whether ``value`` has the form of a Hub repository id, ``namespace/name`` (and not of a weights file)."""
    parts = value.split("/")
    return (
        len(parts) == 2 and all(re.fullmatch(r"[\w.-]+", part) and part not in (".", "..") for part in parts)
        and not value.lower().endswith(_WEIGHT_SUFFIXES)
    )


def check_local_paths(args: argparse.Namespace) -> None:
    """Refuses (``FileNotFoundError``) a path argument that names nothing on disk, before anything is loaded:
    ``--pretrained_model_name_or_path`` and ``--lora_weights`` unless they have the form of a Hub id
    (``user/name``), ``--image``, and the data directory the dataset will be read from."""
    paths = [("--pretrained_model_name_or_path", args.pretrained_model_name_or_path, True),
             ("--lora_weights", args.lora_weights, True), ("--image", getattr(args, "image", None), False)]
    if not getattr(args, "dataset_name", None):  # with --dataset_name, --train_data_dir is a folder of that dataset
        data_dir = ("--train_data_dir", getattr(args, "train_data_dir", None))
        if not data_dir[1]:
            data_dir = ("--instance_data_dir", getattr(args, "instance_data_dir", None))
        paths.append((*data_dir, False))
    for option, value, hub_id_allowed in paths:
        if value is None or os.path.exists(value) or (hub_id_allowed and _could_be_hub_id(value)):
            continue
        kind = "neither a local file or directory nor a Hub repository id 'user/name'" if hub_id_allowed else (
            "no such file or directory")
        raise FileNotFoundError(f"{option} {value!r} does not exist ({kind}); check the path")


def load_pipeline(args: argparse.Namespace):
    """The base pipeline with the LoRA weights, with attribution enabled, on the chosen device."""
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant,
        torch_dtype=DTYPES[args.mixed_precision],
    )
    if args.lora_weights:
        pipeline.load_lora_weights(args.lora_weights)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipeline.set_progress_bar_config(disable=True)
    return enable_attribution(pipeline.to(device))


def run_cache(args: argparse.Namespace) -> None:
    from accelerate import PartialState

    from .training_data import dataset_reference, load_training_dataset

    check_local_paths(args)
    # the settings are checked before the dataset and the pipeline are loaded
    settings = {
        "num_timesteps": args.num_timesteps, "projection_dim": args.projection_dim, "seed": args.dmin_seed,
        "knn_dim": args.knn_dim, "knn_projection": args.knn_projection, "storage_dtype": args.storage_dtype,
        "tracked_parameters": args.tracked_parameters, "shard_size": args.shard_size,
        "output_function": args.output_function, "timestep_spacing": args.timestep_spacing, "noise": args.noise,
        "noise_draws": args.noise_draws, "max_sequence_length": args.max_sequence_length,
        "guidance_scale": args.guidance_scale,
    }
    settings = {key: value for key, value in settings.items() if value is not None}
    config = (DMinConfig.paper if args.paper_recipe else DMinConfig)(
        resolution=args.resolution, base_model=args.pretrained_model_name_or_path, adapter=args.lora_weights,
        **settings,
    )
    # Without cpu=True, accelerate treats several processes on a machine without CUDA as one.
    state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())
    dataset_args = {
        "dataset_name": args.dataset_name, "dataset_config_name": args.dataset_config_name,
        "revision": args.dataset_revision, "max_train_samples": args.max_train_samples, "seed": args.seed,
    }
    reference = dataset_reference(**dataset_args, data_dir=args.train_data_dir if args.dataset_name else None)
    with state.main_process_first():  # download / prepare the dataset once
        dataset = load_training_dataset(
            train_data_dir=args.train_data_dir, instance_data_dir=args.instance_data_dir,
            instance_prompt=args.instance_prompt, cache_dir=args.cache_dir, **dataset_args,
        )
    if args.device is None and state.device.type != "cpu":
        args.device = str(state.device)
    pipeline = load_pipeline(args)
    cache_dataset(
        pipeline, dataset, args.output_dir, config, args.image_column, args.caption_column, accelerator=state,
        dataset_reference=reference, batch_bytes=int(args.batch_memory_mb * 2**20),
    )


def run_attribute(args: argparse.Namespace) -> None:
    import PIL.Image

    check_local_paths(args)
    pipeline = load_pipeline(args)
    pipeline.load_attribution_index(args.index, strict=not args.no_strict)
    result = pipeline.attribute(PIL.Image.open(args.image), args.prompt, top_k=args.top_k, exact=args.exact)
    for rank, (row, score) in enumerate(zip(result.indices, result.scores), start=1):
        print(json.dumps({"rank": rank, "row": row, "score": round(score, 6)}))


def run_app(args: argparse.Namespace) -> None:
    from .app import build_app, load_app_dataset

    check_local_paths(args)
    dataset = load_app_dataset(args.dataset_name, args.dataset_config_name, args.train_data_dir)
    pipeline = load_pipeline(args)
    pipeline.load_attribution_index(args.index, dataset=dataset, strict=not args.no_strict)
    demo = build_app(pipeline, top_k=args.top_k, num_inference_steps=args.num_inference_steps)
    demo.launch(server_name=args.host, server_port=args.port)


def run_push(args: argparse.Namespace) -> None:
    index = AttributionIndex.from_pretrained(args.index)
    commit = index.push_to_hub(
        args.repo_id, private=args.private, token=args.token, branch=args.branch, create_pr=args.create_pr,
        repo_type=args.repo_type,
    )
    print(getattr(commit, "commit_url", commit))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # the library logs its summaries (e.g. how many rows were cached); the command shows them on stderr
    logging.basicConfig(format="%(message)s")
    logging.getLogger("dmin_diffusers").setLevel(logging.INFO)
    try:
        {"cache": run_cache, "attribute": run_attribute, "app": run_app, "push": run_push}[args.command](args)
    except (ValueError, TypeError, OSError, ImportError, HfHubHTTPError) as error:  # OSError: a missing file
        print(f"dmin {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
