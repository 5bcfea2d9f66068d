"""Tiny, offline, deterministic pipelines and data sets for the tests and the benchmarks (not installed).

Nothing here touches the network: tokenizers are written to a local directory from a handful of
hand-made files and loaded back with the ordinary ``from_pretrained`` of ``transformers``; every model
is built from a small config under a fixed seed and put in ``eval()`` mode.

The model sizes follow the ``get_dummy_components`` helpers of diffusers' own test-suite, so a pipeline
builds in well under a second and runs two denoising steps at 16x16 / 32x32 on a CPU in a fraction of a
second (Flux, whose prompts are padded to 512 T5 tokens, in about a second).

Typical use::

    from tiny_models import tiny_pipeline, make_caption_dataset

    pipe = tiny_pipeline("stable-diffusion", lora_rank=4)
    data = make_caption_dataset(num_rows=12)
    image = pipe(data[0]["text"], num_inference_steps=2).images[0]
"""

from __future__ import annotations

import inspect
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "add_lora",
    "lora_target_modules",
    "make_caption_dataset",
    "make_clip_tokenizer",
    "make_image_dataset",
    "make_t5_tokenizer",
    "tiny_ddpm_components",
    "tiny_flux_components",
    "tiny_pipeline",
    "tiny_sd3_components",
    "tiny_sdxl_components",
    "tiny_stable_diffusion_components",
    "FLUX_SCHEDULER_CONFIG",
    "PIPELINE_KINDS",
]

#: The pipeline kinds understood by :func:`tiny_pipeline`.
PIPELINE_KINDS = ("ddpm", "stable-diffusion", "sd3", "sdxl", "flux")

# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------

# A few merges so that the BPE machinery is exercised; every merged symbol is added to the vocabulary.
_CLIP_MERGES: tuple[tuple[str, str], ...] = (
    ("t", "h"),
    ("th", "e</w>"),
    ("o", "n</w>"),
    ("i", "n</w>"),
    ("a", "n"),
    ("e", "r"),
    ("r", "e"),
    ("e", "d</w>"),
    ("c", "i"),
    ("s", "t"),
)

# Whole words that get their own piece in the tiny T5 vocabulary (everything else falls back to letters).
_T5_WORDS: tuple[str, ...] = (
    "a", "an", "the", "on", "in", "of", "and", "with", "left", "right", "top", "bottom", "center",
    "red", "green", "blue", "yellow", "purple", "orange", "circle", "square", "triangle", "stripes",
)


def _byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins GPT-2 / CLIP use for raw bytes, in byte order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    mapping: dict[int, int] = {b: b for b in printable}
    shift = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = 256 + shift
            shift += 1
    return [chr(mapping[byte]) for byte in range(256)]


def make_clip_tokenizer(directory: str | Path):
    """Write a tiny byte-level BPE CLIP tokenizer into ``directory`` and load it.

    The vocabulary holds the 256 byte-level characters, the same with ``</w>`` appended, a few merged
    symbols, ``<|startoftext|>`` and ``<|endoftext|>`` (520 entries in all), so any text tokenizes
    losslessly and different captions give different ids. ``model_max_length`` is 77 as in real CLIP.

    Returns:
        ``transformers.CLIPTokenizer``; its ``bos_token_id``, ``eos_token_id`` (also the pad id) and
        ``len()`` are what a matching ``CLIPTextConfig`` needs.
    """
    from transformers import CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_level_alphabet()
    tokens = alphabet + [ch + "</w>" for ch in alphabet] + [a + b for a, b in _CLIP_MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):  # pragma: no cover - guards edits of the merge list
        raise AssertionError("duplicate CLIP vocabulary entries")
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _CLIP_MERGES)
    (directory / "merges.txt").write_text(merges, encoding="utf-8")
    config = {
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "CLIPTokenizer",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return CLIPTokenizer.from_pretrained(str(directory))


def make_t5_tokenizer(directory: str | Path):
    """Write a tiny Unigram T5 tokenizer (``tokenizer.json``) into ``directory`` and load it.

    Ids follow T5's layout: ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, then ``▁``, space-prefixed and bare
    letters, digits and punctuation, and a few whole caption words. A Metaspace pre-tokenizer and a
    ``$A </s>`` template make it behave like T5's. No sentinel (``<extra_id_*>``) tokens are added, so
    ``len(tokenizer)`` is the whole vocabulary.

    Returns:
        ``transformers.T5TokenizerFast`` (in transformers 5 the same class as ``T5Tokenizer``).
    """
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    characters = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    pieces += [("\u2581" + ch, -3.0) for ch in characters]
    pieces += [(ch, -4.0) for ch in characters]
    pieces += [("\u2581" + word, -1.0) for word in _T5_WORDS]
    model = models.Unigram(pieces, unk_id=2, byte_fallback=False)
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "model_max_length": 512,
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "extra_ids": 0,
        "additional_special_tokens": [],
        "tokenizer_class": "T5Tokenizer",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return T5TokenizerFast.from_pretrained(str(directory))


def _tokenizer_root(tokenizer_dir: str | Path | None) -> Path:
    if tokenizer_dir is None:
        return Path(tempfile.mkdtemp(prefix="dmin-tiny-tokenizers-"))
    path = Path(tokenizer_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------------


def _seeded(seed: int, build):
    """Build a module under ``torch.manual_seed(seed)`` without disturbing the caller's RNG, then eval()."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build()
    return module.eval()


def _clip_text_config(tokenizer, *, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    kwargs: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        max_position_embeddings=77,
        hidden_act="gelu",
    )
    if projection_dim is not None:
        kwargs["projection_dim"] = projection_dim
    return CLIPTextConfig(**kwargs)


def _t5_encoder_config(tokenizer):
    """A 2-layer T5 encoder config (d_model 32, dropout 0) whose vocabulary matches ``tokenizer``."""
    from transformers import T5Config

    return T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_heads=4,
        num_layers=2,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        is_encoder_decoder=False,
        use_cache=False,
    )


def _two_level_vae(image_size: int, **config: Any):
    """A two-level ``AutoencoderKL`` (latents half the image's size, 4 channels), as Stable Diffusion's."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        latent_channels=4, sample_size=image_size, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, **config,
    )


def _one_level_vae(latent_channels: int):
    """A one-level ``AutoencoderKL`` without quant convs and with SD3's ``shift_factor`` / ``scaling_factor``
    (latents the image's size), as SD3 and Flux have."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    )


def tiny_ddpm_components(
    seed: int = 0,
    sample_size: int = 16,
    in_channels: int = 3,
    prediction_type: str = "epsilon",
) -> dict[str, Any]:
    """Components of a tiny unconditional ``DDPMPipeline``.

    Returns:
        ``{"unet": UNet2DModel, "scheduler": DDPMScheduler}``. The UNet has two levels (16 and 32
        channels, attention on the lower one) and produces ``sample_size`` x ``sample_size`` images with
        ``in_channels`` channels; the scheduler has the default 1000-step linear schedule and the given
        ``prediction_type`` ("epsilon", "v_prediction" or "sample").
    """
    from diffusers import DDPMScheduler, UNet2DModel

    unet = _seeded(
        seed,
        lambda: UNet2DModel(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=in_channels,
            block_out_channels=(16, 32),
            layers_per_block=1,
            norm_num_groups=8,
            attention_head_dim=8,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        ),
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    return {"unet": unet, "scheduler": scheduler}


def tiny_stable_diffusion_components(
    seed: int = 0,
    prediction_type: str = "epsilon",
    *,
    scheduler: str = "ddim",
    sample_size: int = 16,
    tokenizer_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Components of a tiny ``StableDiffusionPipeline`` (default output 32x32).

    Returns:
        a dict with ``unet`` (UNet2DConditionModel, 4 latent channels, cross-attention dim 32), ``scheduler``
        (``DDIMScheduler``, or ``PNDMScheduler`` with ``scheduler="pndm"``, on SD's scaled-linear betas and
        the given ``prediction_type``), ``vae`` (AutoencoderKL with two levels, so images are twice the
        latent size), ``text_encoder`` (a 5-layer ``CLIPTextModel`` whose vocabulary matches the tokenizer),
        ``tokenizer`` (:func:`make_clip_tokenizer`, written to ``tokenizer_dir`` or a fresh temporary
        directory), and ``safety_checker`` / ``feature_extractor`` / ``image_encoder`` set to ``None``.
    """
    from diffusers import DDIMScheduler, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = make_clip_tokenizer(_tokenizer_root(tokenizer_dir) / "tokenizer")
    unet = _seeded(
        seed,
        lambda: UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=(16, 32),
            layers_per_block=1,
            norm_num_groups=8,
            attention_head_dim=8,
            cross_attention_dim=32,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        ),
    )
    vae = _seeded(seed + 1, lambda: _two_level_vae(sample_size * 2))
    text_encoder = _seeded(seed + 2, lambda: CLIPTextModel(_clip_text_config(tokenizer)))
    schedule = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
    )
    if scheduler == "ddim":
        noise_scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1, **schedule)
    elif scheduler == "pndm":
        noise_scheduler = PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, **schedule)
    else:
        raise ValueError(f"scheduler must be 'ddim' or 'pndm', not {scheduler!r}")
    return {
        "unet": unet,
        "scheduler": noise_scheduler,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    }


def tiny_sd3_components(seed: int = 0, *, tokenizer_dir: str | Path | None = None) -> dict[str, Any]:
    """Components of a tiny ``StableDiffusion3Pipeline`` (default output 32x32).

    Returns:
        a dict with ``transformer`` (one-layer ``SD3Transformer2DModel``, patch size 1, 4 latent channels),
        ``vae`` (one-level AutoencoderKL without quant convs and with SD3-style ``shift_factor`` /
        ``scaling_factor``, so latents have the image's size), ``scheduler``
        (``FlowMatchEulerDiscreteScheduler``), ``text_encoder`` and ``text_encoder_2``
        (``CLIPTextModelWithProjection``, hidden and projection size 32, different seeds),
        ``text_encoder_3`` (a 2-layer ``T5EncoderModel`` with d_model 32, dropout 0), ``tokenizer`` and
        ``tokenizer_2`` (:func:`make_clip_tokenizer`) and ``tokenizer_3`` (:func:`make_t5_tokenizer`),
        written under ``tokenizer_dir`` or a fresh temporary directory.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    root = _tokenizer_root(tokenizer_dir)
    tokenizer = make_clip_tokenizer(root / "tokenizer")
    tokenizer_2 = make_clip_tokenizer(root / "tokenizer_2")
    tokenizer_3 = make_t5_tokenizer(root / "tokenizer_3")

    transformer = _seeded(
        seed,
        lambda: SD3Transformer2DModel(
            sample_size=32,
            patch_size=1,
            in_channels=4,
            out_channels=4,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=4,
            caption_projection_dim=32,
            joint_attention_dim=32,
            pooled_projection_dim=64,
        ),
    )
    vae = _seeded(seed + 1, lambda: _one_level_vae(latent_channels=4))
    text_encoder = _seeded(
        seed + 2, lambda: CLIPTextModelWithProjection(_clip_text_config(tokenizer, projection_dim=32))
    )
    text_encoder_2 = _seeded(
        seed + 3, lambda: CLIPTextModelWithProjection(_clip_text_config(tokenizer_2, projection_dim=32))
    )
    text_encoder_3 = _seeded(seed + 4, lambda: T5EncoderModel(_t5_encoder_config(tokenizer_3)))
    return {
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tokenizer_2,
        "text_encoder_3": text_encoder_3,
        "tokenizer_3": tokenizer_3,
    }


def tiny_sdxl_components(
    seed: int = 0,
    prediction_type: str = "epsilon",
    *,
    sample_size: int = 16,
    tokenizer_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Components of a tiny ``StableDiffusionXLPipeline`` (default output 32x32).

    Returns:
        a dict with ``unet`` (UNet2DConditionModel with 4 latent channels, SDXL's ``"text_time"`` added
        conditioning with ``addition_time_embed_dim=8``, linear projections in its transformers, and
        cross-attention dim 64, the two text encoders' hidden sizes together), ``vae`` (the two-level
        AutoencoderKL of :func:`tiny_stable_diffusion_components`, with SDXL's ``scaling_factor`` 0.13025),
        ``text_encoder`` (``CLIPTextModel``, hidden size 32), ``text_encoder_2``
        (``CLIPTextModelWithProjection``, hidden and projection size 32; its projection is the pooled
        embedding), ``tokenizer`` and ``tokenizer_2`` (:func:`make_clip_tokenizer`, written under
        ``tokenizer_dir`` or a fresh temporary directory), ``scheduler`` (``EulerDiscreteScheduler`` on SD's
        scaled-linear betas with "leading" spacing and the given ``prediction_type``), and
        ``image_encoder`` / ``feature_extractor`` set to ``None``.
    """
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    root = _tokenizer_root(tokenizer_dir)
    tokenizer = make_clip_tokenizer(root / "tokenizer")
    tokenizer_2 = make_clip_tokenizer(root / "tokenizer_2")
    text_config = _clip_text_config(tokenizer)
    text_config_2 = _clip_text_config(tokenizer_2, projection_dim=32)
    addition_time_embed_dim = 8
    unet = _seeded(
        seed,
        lambda: UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=(16, 32),
            layers_per_block=1,
            norm_num_groups=8,
            attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=addition_time_embed_dim,
            # the pipeline concatenates the penultimate hidden states of both text encoders ...
            cross_attention_dim=text_config.hidden_size + text_config_2.hidden_size,
            # ... and adds the 6 size / crop numbers (original, crop top-left, target) to the pooled embedding
            projection_class_embeddings_input_dim=6 * addition_time_embed_dim + text_config_2.projection_dim,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        ),
    )
    vae = _seeded(seed + 1, lambda: _two_level_vae(sample_size * 2, scaling_factor=0.13025))
    text_encoder = _seeded(seed + 2, lambda: CLIPTextModel(text_config))
    text_encoder_2 = _seeded(seed + 3, lambda: CLIPTextModelWithProjection(text_config_2))
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type=prediction_type,
    )
    return {
        "unet": unet,
        "scheduler": scheduler,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tokenizer_2,
        "image_encoder": None,
        "feature_extractor": None,
    }


#: The scheduler config of FLUX.1-dev (``scheduler/scheduler_config.json``): the shift of the sigmas grows
#: with the number of image tokens, from ``base_shift`` at 256 to ``max_shift`` at 4096.
FLUX_SCHEDULER_CONFIG: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}


def tiny_flux_components(
    seed: int = 0, *, guidance_embeds: bool = False, tokenizer_dir: str | Path | None = None
) -> dict[str, Any]:
    """Components of a tiny ``FluxPipeline`` (default output 32x32 when called with ``height=32, width=32``).

    Returns:
        a dict with ``transformer`` (``FluxTransformer2DModel`` with one double-stream and one single-stream
        block, 2 heads of size 16, patch size 1 and 16 input channels: the VAE's 4 latent channels packed
        2x2 by the pipeline; ``guidance_embeds`` as given, True for a FLUX.1-dev-like guidance-distilled
        model), ``vae`` (the one-level AutoencoderKL of :func:`tiny_sd3_components`, without quant convs and
        with ``shift_factor`` / ``scaling_factor`` 0.0609 / 1.5035, so latents have the image's size),
        ``scheduler`` (``FlowMatchEulerDiscreteScheduler`` with FLUX.1-dev's dynamic-shifting config,
        :data:`FLUX_SCHEDULER_CONFIG`), ``text_encoder`` (``CLIPTextModel``, hidden size 32; the pipeline uses
        its pooled output), ``text_encoder_2`` (a 2-layer ``T5EncoderModel``, d_model 32, dropout 0),
        ``tokenizer`` (:func:`make_clip_tokenizer`) and ``tokenizer_2`` (:func:`make_t5_tokenizer`), written
        under ``tokenizer_dir`` or a fresh temporary directory, and ``image_encoder`` / ``feature_extractor``
        set to ``None``.

    ``FluxPipeline`` packs 2x2 latent patches, so height and width must be multiples of 2 (twice the VAE's
    scale factor of 1); its default size, ``default_sample_size`` (128) times the scale factor, is 128x128.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    root = _tokenizer_root(tokenizer_dir)
    tokenizer = make_clip_tokenizer(root / "tokenizer")
    tokenizer_2 = make_t5_tokenizer(root / "tokenizer_2")
    text_config = _clip_text_config(tokenizer)
    t5_config = _t5_encoder_config(tokenizer_2)
    latent_channels = 4
    transformer = _seeded(
        seed,
        lambda: FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * latent_channels,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=t5_config.d_model,
            pooled_projection_dim=text_config.hidden_size,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(4, 4, 8),
        ),
    )
    vae = _seeded(seed + 1, lambda: _one_level_vae(latent_channels))
    text_encoder = _seeded(seed + 2, lambda: CLIPTextModel(text_config))
    text_encoder_2 = _seeded(seed + 3, lambda: T5EncoderModel(t5_config))
    return {
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tokenizer_2,
        "image_encoder": None,
        "feature_extractor": None,
    }


# --------------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------------

_ATTENTION_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def lora_target_modules(denoiser: torch.nn.Module) -> list[str]:
    """Default LoRA target modules for a denoiser, as in diffusers' LoRA training scripts.

    ``UNet2DConditionModel``, ``SD3Transformer2DModel`` and ``FluxTransformer2DModel``: the attention
    projections ``to_k``, ``to_q``, ``to_v``, ``to_out.0`` (in Flux's single-stream blocks, which have no
    ``to_out``, just the first three). ``UNet2DModel`` (which has few attention layers): those plus the
    resnet convolutions ``conv1`` / ``conv2``.
    """
    if type(denoiser).__name__ == "UNet2DModel":
        return _ATTENTION_TARGETS + ["conv1", "conv2"]
    return list(_ATTENTION_TARGETS)


def add_lora(
    denoiser: torch.nn.Module,
    rank: int = 4,
    seed: int = 0,
    target_modules: list[str] | None = None,
    adapter_name: str = "default",
    b_std: float = 0.02,
) -> torch.nn.Module:
    """Add a peft LoRA adapter to ``denoiser`` in place, the way diffusers' LoRA training scripts do.

    The base weights are frozen (``requires_grad=False``) and the adapter is added with
    ``LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian")``; its ``lora_A`` / ``lora_B``
    parameters are trainable. Because peft initialises ``lora_B`` to zero (a no-op adapter whose ``lora_A``
    would get a zero gradient), every ``lora_B`` is then filled from a seeded ``N(0, b_std**2)``.
    Everything is seeded with ``seed`` (the caller's RNG state is left alone).

    ``UNet2DModel`` has no ``add_adapter`` (it lacks diffusers' ``PeftAdapterMixin``); there the adapter is
    injected with ``peft.inject_adapter_in_model``, which also sets ``denoiser.peft_config``, so
    ``peft.get_peft_model_state_dict(denoiser)`` works for every kind.

    Returns:
        ``denoiser`` itself.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if target_modules is None:
        target_modules = lora_target_modules(denoiser)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        init_lora_weights="gaussian",
        target_modules=list(target_modules),
    )
    denoiser.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if hasattr(denoiser, "add_adapter"):
            denoiser.add_adapter(config, adapter_name=adapter_name)
        else:
            inject_adapter_in_model(config, denoiser, adapter_name=adapter_name)
    generator = torch.Generator().manual_seed(seed + 1)
    found = False
    with torch.no_grad():
        for name, param in denoiser.named_parameters():
            if "lora_" not in name or f".{adapter_name}." not in f".{name}.":
                continue
            found = True
            param.requires_grad_(True)
            if "lora_B" in name:
                noise = torch.randn(param.shape, generator=generator, dtype=torch.float32) * b_std
                param.copy_(noise.to(dtype=param.dtype, device=param.device))
    if not found:
        raise ValueError(f"no LoRA parameters were created; check target_modules={target_modules!r}")
    return denoiser


# --------------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------------


def _default_pipeline_class(kind: str):
    import diffusers

    return {
        "ddpm": diffusers.DDPMPipeline,
        "stable-diffusion": diffusers.StableDiffusionPipeline,
        "sd3": diffusers.StableDiffusion3Pipeline,
        "sdxl": diffusers.StableDiffusionXLPipeline,
        "flux": diffusers.FluxPipeline,
    }[kind]


def tiny_pipeline(
    kind: str,
    pipeline_class: type | None = None,
    seed: int = 0,
    lora_rank: int | None = None,
    **component_kwargs: Any,
):
    """Build a tiny offline pipeline of the given ``kind`` (one of :data:`PIPELINE_KINDS`).

    ``kind`` is "ddpm", "stable-diffusion" (or "sd", "stable_diffusion"), "sd3" (or "stable-diffusion-3"),
    "sdxl" (or "stable-diffusion-xl", "stable_diffusion_xl") or "flux". ``component_kwargs`` go to
    :func:`tiny_ddpm_components`, :func:`tiny_stable_diffusion_components`, :func:`tiny_sd3_components`,
    :func:`tiny_sdxl_components` or :func:`tiny_flux_components` (e.g. ``prediction_type``, ``tokenizer_dir``,
    ``guidance_embeds``). ``pipeline_class`` defaults to ``DDPMPipeline`` / ``StableDiffusionPipeline`` /
    ``StableDiffusion3Pipeline`` / ``StableDiffusionXLPipeline`` / ``FluxPipeline``; any subclass (or other
    class taking the same components) works; components its ``__init__`` does not accept are dropped. The
    SDXL pipeline gets ``add_watermarker=False``. With ``lora_rank``, :func:`add_lora` (seeded with
    ``seed``) is applied to the denoiser (``pipe.transformer`` where the pipeline has one, else
    ``pipe.unet``), and, as in diffusers' LoRA training scripts, every other model of the pipeline is
    frozen too.

    Returns:
        the pipeline, on the CPU, with its progress bar disabled.
    """
    aliases = {
        "sd": "stable-diffusion",
        "stable_diffusion": "stable-diffusion",
        "stable-diffusion-3": "sd3",
        "stable-diffusion-xl": "sdxl",
        "stable_diffusion_xl": "sdxl",
    }
    kind = aliases.get(kind, kind)
    builders = {
        "ddpm": tiny_ddpm_components,
        "stable-diffusion": tiny_stable_diffusion_components,
        "sd3": tiny_sd3_components,
        "sdxl": tiny_sdxl_components,
        "flux": tiny_flux_components,
    }
    if kind not in builders:
        raise ValueError(f"kind must be one of {PIPELINE_KINDS}, not {kind!r}")
    components = builders[kind](seed=seed, **component_kwargs)
    if pipeline_class is None:
        pipeline_class = _default_pipeline_class(kind)

    parameters = inspect.signature(pipeline_class.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    if not takes_any:
        components = {key: value for key, value in components.items() if key in parameters}
        if "requires_safety_checker" in parameters:
            components["requires_safety_checker"] = False
        if "add_watermarker" in parameters:
            components["add_watermarker"] = False
    pipe = pipeline_class(**components)
    pipe.set_progress_bar_config(disable=True)

    if lora_rank is not None:
        denoiser = getattr(pipe, "transformer", None)
        if not isinstance(denoiser, torch.nn.Module):
            denoiser = pipe.unet
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module) and module is not denoiser:
                module.requires_grad_(False)
        add_lora(denoiser, rank=lora_rank, seed=seed)
    return pipe


# --------------------------------------------------------------------------------------------------
# Data sets
# --------------------------------------------------------------------------------------------------

_COLOURS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (220, 30, 30)),
    ("green", (30, 170, 40)),
    ("blue", (30, 60, 220)),
    ("yellow", (235, 210, 20)),
    ("purple", (140, 40, 180)),
    ("orange", (245, 130, 20)),
)
_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "stripes")
_POSITIONS: tuple[tuple[str, float, float], ...] = (
    ("on the left", 0.28, 0.5),
    ("on the right", 0.72, 0.5),
    ("at the top", 0.5, 0.28),
    ("at the bottom", 0.5, 0.72),
    ("in the center", 0.5, 0.5),
)
_BACKGROUNDS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("white", (245, 245, 240)),
    ("black", (15, 15, 20)),
    ("gray", (128, 128, 128)),
    ("cyan", (150, 230, 235)),
)
_COMBINATIONS = len(_SHAPES) * len(_COLOURS) * len(_POSITIONS)  # 120 distinct (shape, colour, position)


def _row_spec(index: int) -> tuple[str, int, int, int, int]:
    """Caption and (shape, colour, position, background) indices of row ``index``; unique per index.

    Consecutive rows differ in shape, colour and position at once.
    """
    block, within = divmod(index, _COMBINATIONS)
    # The first 60 rows use the Chinese-remainder order (all three attributes change each row); the
    # rest of the 120 combinations follow with the colour shifted by one, which is again unique.
    half, step = divmod(within, 60)
    shape = step % len(_SHAPES)
    colour = (step + half) % len(_COLOURS)
    position = step % len(_POSITIONS)
    repeat, background = divmod(block, len(_BACKGROUNDS))
    colour_name = _COLOURS[colour][0]
    shape_name = _SHAPES[shape]
    if shape_name == "stripes":
        subject = f"{colour_name} stripes"
    else:
        article = "an" if colour_name[0] in "aeiou" else "a"
        subject = f"{article} {colour_name} {shape_name}"
    caption = f"{subject} {_POSITIONS[position][0]}"
    if background:
        caption += f" on a {_BACKGROUNDS[background][0]} background"
    if repeat:
        caption += f", number {repeat + 1}"
    return caption, shape, colour, position, background


def _draw_row(index: int, size: int, seed: int):
    """Render row ``index`` as a PIL RGB image of ``size`` x ``size`` with seeded jitter and noise."""
    from PIL import Image, ImageDraw

    _, shape, colour, position, background = _row_spec(index)
    rng = np.random.default_rng([seed, index])
    image = Image.new("RGB", (size, size), _BACKGROUNDS[background][1])
    draw = ImageDraw.Draw(image)
    rgb = _COLOURS[colour][1]
    jitter = rng.uniform(-0.04, 0.04, size=2) * size
    cx = _POSITIONS[position][1] * size + jitter[0]
    cy = _POSITIONS[position][2] * size + jitter[1]
    r = 0.22 * size
    box = [cx - r, cy - r, cx + r, cy + r]
    if _SHAPES[shape] == "circle":
        draw.ellipse(box, fill=rgb)
    elif _SHAPES[shape] == "square":
        draw.rectangle(box, fill=rgb)
    elif _SHAPES[shape] == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=rgb)
    else:  # stripes: vertical bars across the box
        x0, x1 = int(round(cx - r)), int(round(cx + r))
        y0, y1 = int(round(cy - r)), int(round(cy + r))
        bar = max(1, int(round(2 * r / 5)))
        for x in range(x0, x1 + 1, 2 * bar):
            draw.rectangle([x, y0, min(x + bar - 1, x1), y1], fill=rgb)
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels + rng.normal(0.0, 6.0, size=pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def make_caption_dataset(num_rows: int = 12, size: int = 32, seed: int = 0):
    """A small text-to-image data set of coloured shapes.

    Row ``i`` shows one shape (circle, square, triangle or stripes) in one of six colours at one of five
    places, over seeded pixel noise; its caption says exactly that ("a red circle on the left",
    "blue stripes at the top", ...). Every row has a different caption and a visibly different image
    (consecutive rows differ in shape, colour and place); past 120 rows the background changes and is
    named in the caption. ``seed`` changes only the jitter and the noise, never the captions.

    Returns:
        ``datasets.Dataset`` with columns ``"image"`` (``datasets.Image()``, decoded as PIL RGB
        ``size`` x ``size``) and ``"text"``.
    """
    from datasets import Dataset, Features, Image, Value

    images = [_draw_row(i, size, seed) for i in range(num_rows)]
    captions = [_row_spec(i)[0] for i in range(num_rows)]
    features = Features({"image": Image(), "text": Value("string")})
    return Dataset.from_dict({"image": images, "text": captions}, features=features)


def make_image_dataset(num_rows: int = 12, size: int = 16, seed: int = 0, mode: str = "RGB"):
    """An unconditional image data set (for DDPM): the images of :func:`make_caption_dataset`.

    ``mode`` is a PIL mode ("RGB", or "L" for one channel to pair with ``tiny_ddpm_components(in_channels=1)``).

    Returns:
        ``datasets.Dataset`` with the single column ``"image"`` (``datasets.Image()``).
    """
    from datasets import Dataset, Features, Image

    images = [_draw_row(i, size, seed).convert(mode) for i in range(num_rows)]
    return Dataset.from_dict({"image": images}, features=Features({"image": Image()}))
