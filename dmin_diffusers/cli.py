"""The `dmin` command: cache a training set after training, attribute an image, push an index to the Hub.

```
accelerate launch -m dmin_diffusers.cli cache <the training script's own arguments>   # -> <output_dir>/dmin-index
dmin attribute --index my-run/dmin-index --pretrained_model_name_or_path ... --lora_weights my-run --image gen.png
dmin app --index my-run/dmin-index --pretrained_model_name_or_path ... --dataset_name ...   # a page (Gradio)
dmin push --index my-run/dmin-index --repo_id user/name
```
Argument names follow diffusers' training scripts so that their values can be reused as they are; `dmin cache`
accepts every argument of the scripts in ``TRAINING_SCRIPTS`` and ignores those that only steer training.
Every failure is one line on stderr and exit code 2 (130 for Ctrl-C).
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import HfHubHTTPError

from .app import DEFAULT_NUM_INFERENCE_STEPS
from .caching import DEFAULT_CAPTION_COLUMN, DEFAULT_IMAGE_COLUMN, cache_dataset
from .config import SCORING_FIELDS, DMinConfig
from .gradients import DEFAULT_BATCH_BYTES
from .hub import DEFAULT_REPO_TYPE
from .index import AttributionIndex
from .search import DEFAULT_TOP_K
from .inputs import open_image
from .locks import IndexBusyError
from .mixin import enable_attribution
from .setting_arguments import add_setting_arguments, chosen_settings
from .training_data import INDEX_SUBFOLDER

logger = logging.getLogger(__name__)
DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: the file diffusers' LoRA training scripts write into ``--output_dir`` (and each ``checkpoint-N`` folder)
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
#: diffusers' example scripts whose arguments ``dmin cache`` accepts as they are
TRAINING_SCRIPTS = (
    "text_to_image/train_text_to_image.py", "text_to_image/train_text_to_image_lora.py",
    "text_to_image/train_text_to_image_lora_sdxl.py", "dreambooth/train_dreambooth_lora.py",
    "dreambooth/train_dreambooth_lora_sd3.py", "dreambooth/train_dreambooth_lora_flux.py",
    "unconditional_image_generation/train_unconditional.py",
)
#: the arguments of ``TRAINING_SCRIPTS`` that only steer training (optimiser, schedule, batches, LoRA shape,
#: validation, logging, the Hub, loss weighting, prior preservation: class images are not cached): accepted by
#: ``dmin cache`` and ignored. The value is how many values each takes, as argparse's ``nargs`` (0: a flag).
TRAINING_ONLY_ARGUMENTS: dict[str, int | str | None] = {
    **dict.fromkeys([
        "--allow_tf32", "--cache_latents", "--debug_loss", "--dream_training", "--enable_npu_flash_attention",
        "--enable_xformers_memory_efficient_attention", "--foreach_ema", "--gradient_checkpointing",
        "--hub_private_repo", "--offload_ema", "--overwrite_output_dir", "--pre_compute_text_embeddings",
        "--preserve_input_precision", "--push_to_hub", "--scale_lr", "--train_text_encoder", "--upcast_before_saving",
        "--use_8bit_adam", "--use_ema", "--with_prior_preservation",
    ], 0),
    **dict.fromkeys([
        "--adam_beta1", "--adam_beta2", "--adam_epsilon", "--adam_weight_decay", "--adam_weight_decay_text_encoder",
        "--checkpointing_steps", "--checkpoints_total_limit", "--class_data_dir", "--class_prompt",
        "--dataloader_num_workers", "--ddpm_beta_schedule", "--ddpm_num_inference_steps", "--ddpm_num_steps",
        "--dream_detail_preservation", "--ema_inv_gamma", "--ema_max_decay", "--ema_power", "--eval_batch_size",
        "--gradient_accumulation_steps", "--hub_model_id", "--hub_token", "--input_perturbation", "--learning_rate",
        "--local_rank", "--logger", "--logging_dir", "--logit_mean", "--logit_std", "--lora_alpha", "--lora_blocks",
        "--lora_dropout", "--lora_layers", "--lr_num_cycles", "--lr_power", "--lr_scheduler", "--lr_warmup_steps",
        "--max_grad_norm", "--max_train_steps", "--mode_scale", "--model_config_name_or_path", "--noise_offset",
        "--non_ema_revision", "--num_class_images", "--num_epochs", "--num_train_epochs", "--num_validation_images",
        "--optimizer", "--precondition_outputs", "--prior_generation_precision", "--prior_loss_weight",
        "--prodigy_beta3", "--prodigy_decouple", "--prodigy_safeguard_warmup", "--prodigy_use_bias_correction",
        "--rank", "--repeats", "--report_to", "--resume_from_checkpoint", "--sample_batch_size",
        "--save_images_epochs", "--save_model_epochs", "--snr_gamma", "--text_encoder_lr", "--tracker_project_name",
        "--train_batch_size", "--validation_epochs", "--validation_prompt", "--weighting_scheme",
    ], None),
    "--validation_images": "+",
    "--validation_prompts": "+",
}
#: arguments of ``TRAINING_SCRIPTS`` that change the training loss in a way ``dmin cache`` does not reproduce
#: (nargs as above): refused when given, rather than caching gradients of another loss
UNSUPPORTED_ARGUMENTS: dict[str, int | str | None] = {
    "--class_labels_conditioning": None, "--dream_training": 0, "--text_encoder_use_attention_mask": 0,
    "--tokenizer_max_length": None, "--tokenizer_name": None,
}
#: the defaults of ``TRAINING_SCRIPTS`` for each family, for the settings the command line leaves out: SD's and
#: SDXL's text-to-image and DreamBooth LoRA scripts resize with lanczos to 512 / 1024 pixels, the SD3 and Flux
#: DreamBooth scripts bilinearly to 512; train_unconditional.py resizes bilinearly to its --resolution, at which it
#: builds the model (the denoiser's native size, DMinConfig's default)
SCRIPT_DEFAULTS: dict[str, dict[str, object]] = {
    "stable-diffusion": {"resolution": 512, "image_interpolation_mode": "lanczos"},
    "sdxl": {"resolution": 1024, "image_interpolation_mode": "lanczos"},
    "sd3": {"resolution": 512, "image_interpolation_mode": "bilinear"},
    "flux": {"resolution": 512, "image_interpolation_mode": "bilinear"},
    "ddpm": {"image_interpolation_mode": "bilinear"},
}
SCRIPT_DEFAULT_NOTES = {
    "resolution": " Left out: the family's training scripts' (SD 512, SDXL 1024, SD3 and Flux 512, DDPM the model's).",
    "image_interpolation_mode": " Left out: the family's training scripts' (lanczos for SD and SDXL, bilinear for the "
                                "others).",
}


def _add_pipeline_arguments(parser: argparse.ArgumentParser, model_help: str | None = None) -> None:
    parser.add_argument("--pretrained_model_name_or_path", required=model_help is None,
                        help=model_help or "base pipeline (path or Hub id)")
    parser.add_argument("--revision", default=None, help="revision of the base pipeline")
    parser.add_argument("--variant", default=None, help="weights variant of the base pipeline, e.g. fp16")
    parser.add_argument("--lora_weights", default=None,
                        help=f"LoRA weights: the training run's output_dir (holding {LORA_WEIGHTS_NAME}), a "
                        "checkpoint-N folder, a .safetensors file or a Hub id")
    parser.add_argument("--pretrained_vae_model_name_or_path", default=None,
                        help="a VAE to use instead of the pipeline's (as the SDXL training script's option)")
    parser.add_argument("--mixed_precision", choices=sorted(DTYPES), default="no", help="dtype of the weights")
    parser.add_argument("--device", default=None, help="device (default: cuda if available, else cpu)")


def _add_training_script_arguments(parser: argparse.ArgumentParser) -> None:
    """The training scripts' arguments that ``dmin cache`` ignores or refuses. They are hidden from the help and
    absent from the parsed namespace unless given (``argparse.SUPPRESS``), so the ones given can be listed."""
    for name, nargs in {**TRAINING_ONLY_ARGUMENTS, **UNSUPPORTED_ARGUMENTS}.items():
        if nargs == 0:
            parser.add_argument(name, action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        else:
            parser.add_argument(name, nargs=nargs, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    """The ``dmin`` command line: one sub-command per job."""
    parser = argparse.ArgumentParser(prog="dmin", description="DMin training-data attribution for diffusers")
    commands = parser.add_subparsers(dest="command", required=True)
    for add_command in (_add_cache_command, _add_attribute_command, _add_app_command, _add_refit_command,
                        _add_push_command):
        add_command(commands)
    return parser


def _add_cache_command(commands: Any) -> None:
    """``dmin cache``: a training script's arguments, and the DMin settings."""
    cache = commands.add_parser(
        "cache", help="cache the compressed gradients of a training set",
        # no abbreviations: a misspelt option must be an error, not a prefix of a training script's option
        allow_abbrev=False,
        description="Caches the DMin vectors of a training set with the trained model. Takes the training "
        "script's own arguments (those of diffusers' " + ", ".join(Path(s).name for s in TRAINING_SCRIPTS) + "): "
        "the ones that only steer training are ignored and listed in the log. The index goes to "
        f"<output_dir>/{INDEX_SUBFOLDER}, where GradientCacheCallback puts it, replacing an index an earlier training "
        "run left there (--index_dir elsewhere: an index there is only resumed, other settings are refused); the "
        "model is "
        f"the one the run saved there: its {LORA_WEIGHTS_NAME} on --pretrained_model_name_or_path, or the "
        "pipeline it saved (train_text_to_image.py, train_unconditional.py).",
    )
    _add_pipeline_arguments(
        cache, model_help="base pipeline (path or Hub id); not needed when --output_dir holds the pipeline the "
        "training run saved (model_index.json), which is then the one cached",
    )
    cache.add_argument("--dataset_name", default=None)
    cache.add_argument("--dataset_config_name", default=None)
    cache.add_argument("--dataset_revision", default=None)
    cache.add_argument("--train_data_dir", default=None, help="an imagefolder (captions in metadata.jsonl)")
    cache.add_argument("--instance_data_dir", default=None, help="DreamBooth instance images")
    cache.add_argument("--instance_prompt", default=None)
    cache.add_argument("--cache_dir", default=None)
    cache.add_argument("--image_column", default=DEFAULT_IMAGE_COLUMN)
    cache.add_argument("--caption_column", default=DEFAULT_CAPTION_COLUMN)
    cache.add_argument("--center_crop", action="store_true",
                       help="accepted for compatibility: caching always center-crops")
    cache.add_argument("--random_flip", action="store_true", help="accepted for compatibility: caching never flips")
    cache.add_argument("--prediction_type", default=None,
                       help="the training script's option: must match the pipeline's scheduler (its training target)")
    cache.add_argument("--max_train_samples", type=int, default=None)
    cache.add_argument("--seed", type=int, default=None, help="the training seed (selects max_train_samples rows)")
    cache.add_argument("--output_dir", default=None,
                       help=f"the training run's output directory: the index goes to <output_dir>/{INDEX_SUBFOLDER} "
                       f"and, without --lora_weights, the LoRA is <output_dir>/{LORA_WEIGHTS_NAME} when it is there")
    cache.add_argument("--index_dir", default=None,
                       help=f"directory of the attribution index (default: <output_dir>/{INDEX_SUBFOLDER})")
    # DMin settings, from their declarations (None leaves DMinConfig's default)
    add_setting_arguments(cache, notes=SCRIPT_DEFAULT_NOTES)
    cache.add_argument("--batch_memory_mb", type=float, default=DEFAULT_BATCH_BYTES / 2**20,
                       help="memory budget of one batched backward (per-sample gradients and activations; "
                       "default %(default)g; 0: one (row, timestep) at a time)")
    cache.add_argument("--paper_recipe", action="store_true",
                       help="the DMin paper's exact recipe (DMinConfig.paper()) instead of the measured default")
    _add_training_script_arguments(cache)


def _add_attribute_command(commands: Any) -> None:
    """``dmin attribute``."""
    attribute = commands.add_parser("attribute", help="the most influential training rows of an image")
    _add_pipeline_arguments(attribute)
    attribute.add_argument("--index", required=True, help="attribution index (directory or Hub id)")
    attribute.add_argument("--image", required=True)
    attribute.add_argument("--prompt", default=None)
    attribute.add_argument("--top_k", type=int, default=DEFAULT_TOP_K)
    attribute.add_argument("--exact", action="store_true", help="score every row instead of HNSW")
    attribute.add_argument("--no_strict", action="store_true", help="allow an index of another model (warns)")


def _add_app_command(commands: Any) -> None:
    """``dmin app``."""
    app = commands.add_parser("app", help='a page to look at attributions (pip install "dmin-diffusers[app]")')
    _add_pipeline_arguments(app)
    app.add_argument("--index", required=True, help="attribution index (directory or Hub id)")
    app.add_argument("--dataset_name", default=None,
                     help="the training rows: a Hub dataset, or a directory written by Dataset.save_to_disk "
                     "(default: the Hub dataset the index records, if any)")
    app.add_argument("--dataset_config_name", default=None)
    app.add_argument("--train_data_dir", default=None, help="an imagefolder of the training rows")
    app.add_argument("--top_k", type=int, default=DEFAULT_TOP_K)
    app.add_argument("--num_inference_steps", type=int, default=DEFAULT_NUM_INFERENCE_STEPS, help="the page's default generation steps")
    app.add_argument("--host", default=None,
                     help="address to serve the page on (default: $GRADIO_SERVER_NAME, else 127.0.0.1)")
    app.add_argument("--port", type=int, default=None,
                     help="port to serve the page on (default: $GRADIO_SERVER_PORT, else 7860)")
    app.add_argument("--no_strict", action="store_true", help="allow an index of another model (warns)")


def _add_refit_command(commands: Any) -> None:
    """``dmin refit``."""
    refit = commands.add_parser(
        "refit", help="switch an index to another preconditioning, fitted from its stored rows (no gradients)"
    )
    refit.add_argument("--index", required=True, help="directory of the attribution index")
    add_setting_arguments(refit, names=SCORING_FIELDS)


def _add_push_command(commands: Any) -> None:
    """``dmin push``."""
    push = commands.add_parser("push", help="upload an attribution index to the Hugging Face Hub")
    push.add_argument("--index", required=True)
    push.add_argument("--repo_id", required=True)
    push.add_argument("--private", action="store_true")
    push.add_argument("--token", default=None)
    push.add_argument("--branch", "--revision", dest="branch", default=None, help="branch to push to")
    push.add_argument("--create_pr", action="store_true", help="open a pull request instead of committing")
    push.add_argument("--repo_type", default=DEFAULT_REPO_TYPE)



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
    ``--pretrained_model_name_or_path``, ``--pretrained_vae_model_name_or_path`` and ``--lora_weights`` unless they
    have the form of a Hub id (``user/name``), ``--image``, and the data directory the dataset will be read from;
    and a ``--lora_weights`` directory without LoRA weights in it."""
    paths = [("--pretrained_model_name_or_path", args.pretrained_model_name_or_path, True),
             ("--pretrained_vae_model_name_or_path", args.pretrained_vae_model_name_or_path, True),
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
    if args.lora_weights and os.path.isdir(args.lora_weights):
        check_lora_directory(args.lora_weights)


def check_lora_directory(directory: str | os.PathLike) -> None:
    """Refuses (``FileNotFoundError``, naming ``LORA_WEIGHTS_NAME``) a ``--lora_weights`` directory that holds no
    weights diffusers' ``load_lora_weights`` would read (a ``.safetensors`` file, or the legacy ``.bin``)."""
    names = os.listdir(directory)
    if not any(name.endswith(".safetensors") or name == "pytorch_lora_weights.bin" for name in names):
        raise FileNotFoundError(
            f"--lora_weights {str(directory)!r} holds no {LORA_WEIGHTS_NAME} (the file the training scripts write at "
            "the end of training and in each checkpoint-N folder); pass the training run's output_dir or the "
            ".safetensors file"
        )


def load_pipeline(args: argparse.Namespace):
    """The base pipeline (with ``--pretrained_vae_model_name_or_path`` as its VAE) with the LoRA weights, with
    attribution enabled, on the chosen device."""
    from diffusers import AutoencoderKL, DiffusionPipeline

    dtype = DTYPES[args.mixed_precision]
    components = {}
    if args.pretrained_vae_model_name_or_path:  # as the SDXL script loads it: revision and variant of the base
        components["vae"] = AutoencoderKL.from_pretrained(
            args.pretrained_vae_model_name_or_path, revision=args.revision, variant=args.variant, torch_dtype=dtype
        )
    pipeline = DiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant, torch_dtype=dtype,
        **components,
    )
    if args.lora_weights:
        pipeline.load_lora_weights(args.lora_weights)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipeline.set_progress_bar_config(disable=True)
    return enable_attribution(pipeline.to(device))


def resolve_training_run(args: argparse.Namespace) -> None:
    """Fills in, from the training run's ``--output_dir``, what ``dmin cache`` needs as ``GradientCacheCallback``
    would use it: ``index_dir`` (``<output_dir>/dmin-index`` unless given; when the run's weights are there, an index
    there built on other weights or settings, left by an earlier run, is replaced with a warning), the pipeline the
    run saved there
    (``model_index.json``: it replaces ``--pretrained_model_name_or_path``) and, without ``--lora_weights``, the
    LoRA it saved there. Refuses a run with checkpoints but no final weights, and the scripts' arguments that
    ``dmin cache`` cannot reproduce (``UNSUPPORTED_ARGUMENTS``)."""
    given = [name for name in UNSUPPORTED_ARGUMENTS if hasattr(args, name[2:])]
    if given:
        raise ValueError(
            f"{', '.join(given)}: the training run computed its loss in a way dmin cache does not reproduce, so the "
            "cached gradients would be of another loss; cache with GradientCacheCallback in the script instead"
        )
    if args.index_dir is None and args.output_dir is None:
        raise ValueError(f"give --output_dir (the training run's; the index goes to <output_dir>/{INDEX_SUBFOLDER}) "
                         "or --index_dir")
    run = Path(args.output_dir) if args.output_dir else None
    # the index inside a training run's output is replaced when it describes other weights (a training re-run), as
    # the callback does; any other index (--index_dir, or a directory without a training run's weights) is only
    # ever resumed
    holds_weights = run is not None and ((run / "model_index.json").is_file() or (run / LORA_WEIGHTS_NAME).is_file())
    args.replace_stale = args.index_dir is None and holds_weights
    if args.index_dir is None:
        args.index_dir = os.path.join(args.output_dir, INDEX_SUBFOLDER)
    if run is not None and (run / "model_index.json").is_file():
        if args.pretrained_model_name_or_path not in (None, str(run)):
            logger.info(f"caching the pipeline the training run saved in {run}, not --pretrained_model_name_or_path "
                        f"{args.pretrained_model_name_or_path}")
        args.pretrained_model_name_or_path = str(run)
    elif args.lora_weights is None and run is not None and (run / LORA_WEIGHTS_NAME).is_file():
        args.lora_weights = str(run)
        logger.info(f"LoRA weights: {run / LORA_WEIGHTS_NAME} (the training run's)")
    elif args.lora_weights is None and run is not None and run.is_dir() and any(run.glob("checkpoint-*")):
        raise FileNotFoundError(
            f"the training run in {run} has checkpoints but no final {LORA_WEIGHTS_NAME} or model_index.json: let it "
            f"finish, or pass --lora_weights {run}/checkpoint-N"
        )
    if args.pretrained_model_name_or_path is None:
        raise ValueError("give --pretrained_model_name_or_path (or an --output_dir holding the pipeline the training "
                         "run saved)")


def ignored_training_arguments(args: argparse.Namespace) -> list[str]:
    """The training-only arguments (``TRAINING_ONLY_ARGUMENTS``) that were given, sorted."""
    return sorted(name for name in TRAINING_ONLY_ARGUMENTS if hasattr(args, name[2:]))


def script_defaults(args: argparse.Namespace, family_name: str) -> dict[str, object]:
    """The settings of ``SCRIPT_DEFAULTS`` for the family that the command line left out (``--resolution``,
    ``--image_interpolation_mode``): what the training script used when they were not given."""
    defaults = SCRIPT_DEFAULTS.get(family_name, {})
    chosen = {name: value for name, value in defaults.items() if getattr(args, name) is None}
    if chosen:
        said = ", ".join(f"{name} {value}" for name, value in chosen.items())
        logger.info(f"{said}: the defaults of diffusers' {family_name} training scripts (pass "
                    f"{' / '.join('--' + name for name in chosen)} if the training run used others)")
    return chosen


def check_prediction_type(args: argparse.Namespace, pipeline) -> None:
    """Refuses a ``--prediction_type`` other than the pipeline scheduler's: the cache reads the training target from
    the scheduler config, so gradients of another target than the run's would be cached."""
    scheduled = pipeline.scheduler.config.get("prediction_type")
    if args.prediction_type is not None and args.prediction_type != scheduled:
        raise ValueError(
            f"--prediction_type {args.prediction_type} differs from the scheduler's ({scheduled}), which gives the "
            "training target here: save the pipeline with a scheduler of that prediction_type and cache that one"
        )


def run_cache(args: argparse.Namespace) -> None:
    from accelerate import PartialState

    from .families import detect_family
    from .training_data import dataset_reference, load_training_dataset

    ignored = ignored_training_arguments(args)
    if ignored:
        logger.info(f"ignored training-only arguments: {' '.join(ignored)}")
    resolve_training_run(args)
    check_local_paths(args)
    # the settings are checked before the dataset and the pipeline are loaded
    config = (DMinConfig.paper if args.paper_recipe else DMinConfig)(**chosen_settings(args), adapter=args.lora_weights)
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
    check_prediction_type(args, pipeline)
    config = config.replace(**script_defaults(args, detect_family(pipeline).name))
    cache_dataset(
        pipeline, dataset, args.index_dir, config, args.image_column, args.caption_column, accelerator=state,
        dataset_reference=reference, batch_bytes=int(args.batch_memory_mb * 2**20), replace_stale=args.replace_stale,
    )


def run_attribute(args: argparse.Namespace) -> None:
    check_local_paths(args)
    pipeline = load_pipeline(args)
    pipeline.load_attribution_index(args.index, strict=not args.no_strict)
    # oriented by its EXIF tag, as `datasets` decodes the training rows
    result = pipeline.attribute(open_image(args.image), args.prompt, top_k=args.top_k, exact=args.exact)
    for rank, (row, score) in enumerate(zip(result.indices, result.scores), start=1):
        print(json.dumps({"rank": rank, "row": row, "score": round(score, 6)}))


def launch_settings(args: argparse.Namespace) -> dict:
    """The ``launch()`` arguments given on the command line; without them Gradio reads ``GRADIO_SERVER_NAME`` /
    ``GRADIO_SERVER_PORT`` (what Spaces and containers set), else serves on 127.0.0.1:7860."""
    given = {"server_name": args.host, "server_port": args.port}
    return {key: value for key, value in given.items() if value is not None}


def run_app(args: argparse.Namespace) -> None:
    from .app import build_app, load_app_dataset

    check_local_paths(args)
    dataset = load_app_dataset(args.dataset_name, args.dataset_config_name, args.train_data_dir)
    pipeline = load_pipeline(args)
    pipeline.load_attribution_index(args.index, dataset=dataset, strict=not args.no_strict)
    demo = build_app(pipeline, top_k=args.top_k, num_inference_steps=args.num_inference_steps)
    demo.launch(**launch_settings(args))


def run_refit(args: argparse.Namespace) -> None:
    index = AttributionIndex(args.index)
    if index.read_only:
        raise ValueError(f"{args.index} is read-only: copy it first (AttributionIndex.save_pretrained)")
    index.refit(**chosen_settings(args))
    print(f"{args.index}: preconditioning {index.config.preconditioning} "
          f"(damping {index.config.preconditioning_damping:g}), {index.num_rows} rows")


def run_push(args: argparse.Namespace) -> None:
    index = AttributionIndex.from_pretrained(args.index)
    commit = index.push_to_hub(
        args.repo_id, private=args.private, token=args.token, branch=args.branch, create_pr=args.create_pr,
        repo_type=args.repo_type,
    )
    print(getattr(commit, "commit_url", commit))


#: errors whose message is for the user as it is (the others are shown with their type)
EXPECTED_ERRORS = (ValueError, TypeError, OSError, ImportError, HfHubHTTPError, IndexBusyError)
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


#: longer messages are cut in the middle (a hostile file's values are echoed in some of them)
MAX_MESSAGE_CHARS = 1000


def _one_line(text: object) -> str:
    line = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    if len(line) > MAX_MESSAGE_CHARS:
        half = MAX_MESSAGE_CHARS // 2
        line = f"{line[:half]} [... {len(line) - 2 * half} characters ...] {line[-half:]}"
    return line


def describe_error(error: BaseException, args: argparse.Namespace) -> str:
    """One line saying what went wrong and what to do."""
    if isinstance(error, OSError) and error.errno in NO_SPACE_ERRNOS:
        where = error.filename or getattr(args, "index_dir", None) or "the output directory"
        if args.command == "cache":
            return (f"no space left on device writing {where}; the finished rows are kept: free some space and run "
                    "the same command again to resume")
        return f"no space left on device writing {where}; free some space and run the same command again"
    if isinstance(error, RecursionError):
        return (f"a file is nested too deeply to read ({_one_line(error)}): it is damaged or was not written by "
                "dmin-diffusers")
    message = _one_line(error)
    if isinstance(error, EXPECTED_ERRORS) and message:
        return message
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def describe_interrupt(args: argparse.Namespace) -> str:
    """The line shown for Ctrl-C."""
    if args.command == "cache":
        return "interrupted; the finished rows are kept: run the same command again to resume"
    return "interrupted"


def _end_progress_bars() -> None:
    """Closes the progress bars a failure left open, so that the error line starts a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):  # tqdm's registry of open bars
        bar.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``dmin``. Returns 0, 2 after any failure (one line on stderr), or 130 after Ctrl-C."""
    args = build_parser().parse_args(argv)
    # the library logs its summaries (e.g. how many rows were cached); the command shows them on stderr
    logging.basicConfig(format="%(message)s")
    logging.getLogger("dmin_diffusers").setLevel(logging.INFO)
    try:
        {"cache": run_cache, "attribute": run_attribute, "app": run_app, "refit": run_refit, "push": run_push}[args.command](args)
    except KeyboardInterrupt:
        _end_progress_bars()
        print(f"dmin {args.command}: {describe_interrupt(args)}", file=sys.stderr)
        return 130
    except Exception as error:  # every failure is one line: a traceback tells a user nothing they can act on
        _end_progress_bars()
        print(f"dmin {args.command}: error: {describe_error(error, args)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
