"""Tests of the tiny offline pipelines and data sets in ``tiny_models``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tiny_models import (
    FLUX_SCHEDULER_CONFIG,
    PIPELINE_KINDS,
    add_lora,
    make_caption_dataset,
    make_clip_tokenizer,
    make_image_dataset,
    make_t5_tokenizer,
    tiny_ddpm_components,
    tiny_flux_components,
    tiny_pipeline,
    tiny_sd3_components,
    tiny_sdxl_components,
    tiny_stable_diffusion_components,
)

CAPTIONS = [
    "a red circle on the left",
    "a red circle on the right",
    "a blue circle on the left",
    "A Red Circle On The Left!",
    "photo 12",
    "photo 21",
    "photo 112",
    "the",
]

# kind -> (expected image shape of one output, denoiser attribute)
KINDS = {
    "ddpm": ((16, 16, 3), "unet"),
    "stable-diffusion": ((32, 32, 3), "unet"),
    "sd3": ((32, 32, 3), "transformer"),
    "sdxl": ((32, 32, 3), "unet"),
    "flux": ((32, 32, 3), "transformer"),
}

BUILDERS = {
    "ddpm": tiny_ddpm_components,
    "stable-diffusion": tiny_stable_diffusion_components,
    "sd3": tiny_sd3_components,
    "sdxl": tiny_sdxl_components,
    "flux": tiny_flux_components,
}

# the text-to-image kinds
TEXT_KINDS = [kind for kind in KINDS if kind != "ddpm"]

# (kind, component kwargs): every kind, plus the variants of the new ones
VARIANTS = [(kind, {}) for kind in KINDS] + [
    ("sdxl", {"prediction_type": "v_prediction"}),
    ("flux", {"guidance_embeds": True}),
]


def _variant_id(variant):
    kind, kwargs = variant
    return "-".join([kind] + [f"{k}={v}" for k, v in kwargs.items()])


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Everything here must work without the Hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models run fastest on one thread; with two, a busy 2-core machine slows them down 10-50x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _modules(components):
    return {k: v for k, v in components.items() if isinstance(v, torch.nn.Module)}


def _denoiser_inputs(kind, denoiser):
    """Small seeded inputs for one forward pass of each denoiser."""
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([500])
    if kind == "ddpm":
        c, s = denoiser.config.in_channels, denoiser.config.sample_size
        return dict(sample=torch.randn(1, c, s, s, generator=g), timestep=t)
    if kind == "stable-diffusion":
        return dict(
            sample=torch.randn(1, 4, 16, 16, generator=g),
            timestep=t,
            encoder_hidden_states=torch.randn(1, 7, 32, generator=g),
        )
    if kind == "sdxl":
        return dict(
            sample=torch.randn(1, 4, 16, 16, generator=g),
            timestep=t,
            encoder_hidden_states=torch.randn(1, 7, 64, generator=g),
            added_cond_kwargs=dict(
                text_embeds=torch.randn(1, 32, generator=g),
                time_ids=torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]),
            ),
        )
    if kind == "flux":
        from diffusers import FluxPipeline

        # a 4x4 latent packed into 2x2 patches of 4 channels: 4 tokens of 16 channels
        return dict(
            hidden_states=torch.randn(1, 4, 16, generator=g),
            timestep=t / 1000,  # Flux takes sigma-like timesteps in [0, 1]
            encoder_hidden_states=torch.randn(1, 7, 32, generator=g),
            pooled_projections=torch.randn(1, 32, generator=g),
            txt_ids=torch.zeros(7, 3),
            img_ids=FluxPipeline._prepare_latent_image_ids(1, 2, 2, "cpu", torch.float32),
            guidance=torch.tensor([3.5]) if denoiser.config.guidance_embeds else None,
        )
    return dict(
        hidden_states=torch.randn(1, 4, 8, 8, generator=g),
        timestep=t,
        encoder_hidden_states=torch.randn(1, 7, 32, generator=g),
        pooled_projections=torch.randn(1, 64, generator=g),
    )


def _generate(pipe, kind, prompt="a red circle on the left"):
    """Two seeded denoising steps; text-to-image kinds at 32x32 (Flux's default would be 128x128)."""
    kwargs = dict(num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    if kind != "ddpm":
        kwargs.update(prompt=prompt, height=32, width=32)
    return pipe(**kwargs).images


# ------------------------------------------------------------------------------------------------
# tokenizers
# ------------------------------------------------------------------------------------------------


def test_clip_tokenizer_offline_distinct_ids(tmp_path):
    tok = make_clip_tokenizer(tmp_path / "clip")
    assert (tmp_path / "clip" / "vocab.json").exists()
    assert (tmp_path / "clip" / "merges.txt").read_text().startswith("#version: 0.2")
    assert tok.model_max_length == 77
    assert len(tok) == len(tok.get_vocab()) > 2 * 256 + 2  # bytes, bytes + </w>, merges, 2 specials
    assert tok.eos_token_id == len(tok) - 1 and tok.bos_token_id == len(tok) - 2
    assert tok.convert_ids_to_tokens(tok.bos_token_id) == "<|startoftext|>"
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == "<|endoftext|>"

    ids = [tuple(tok(c).input_ids) for c in CAPTIONS[:3] + CAPTIONS[4:]]
    assert len(set(ids)) == len(ids)
    assert all(i[0] == tok.bos_token_id and i[-1] == tok.eos_token_id for i in ids)
    assert all(max(i) < len(tok) for i in ids)
    # CLIP lower-cases and ignores punctuation-spacing; the merged tokens are used
    assert "the</w>" in tok.convert_ids_to_tokens(tok("the").input_ids)
    padded = tok(CAPTIONS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert padded.input_ids.shape == (len(CAPTIONS), 77)


def test_t5_tokenizer_offline_distinct_ids(tmp_path):
    tok = make_t5_tokenizer(tmp_path / "t5")
    assert (tmp_path / "t5" / "tokenizer.json").exists()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = [tuple(tok(c).input_ids) for c in CAPTIONS]
    assert len(set(ids)) == len(ids)
    assert all(i[-1] == tok.eos_token_id for i in ids)
    assert not any(tok.unk_token_id in i for i in ids)
    assert all(max(i) < len(tok) for i in ids)
    assert tok.decode(tok("photo 12 of a red square").input_ids, skip_special_tokens=True) == (
        "photo 12 of a red square"
    )
    padded = tok(CAPTIONS[:2], padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    assert padded.input_ids.shape == (2, 16)
    assert padded.input_ids[0, -1].item() == tok.pad_token_id


# ------------------------------------------------------------------------------------------------
# pipelines
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
def test_tiny_pipeline_builds_and_runs_offline(variant):
    kind, component_kwargs = variant
    shape, denoiser_name = KINDS[kind]
    pipe = tiny_pipeline(kind, **component_kwargs)
    assert isinstance(getattr(pipe, denoiser_name), torch.nn.Module)
    for name, module in _modules(pipe.components).items():
        assert not module.training, f"{name} is not in eval mode"
    images = _generate(pipe, kind)
    assert images.shape == (1, *shape)
    assert np.isfinite(images).all()

    # the prompt reaches the model: different prompts, different images
    if kind != "ddpm":
        other = _generate(pipe, kind, prompt="blue stripes at the top")
        assert np.abs(images - other).max() > 1e-4


@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
def test_save_pretrained_round_trip_offline(variant, tmp_path):
    from diffusers import DiffusionPipeline

    kind, component_kwargs = variant
    pipe = tiny_pipeline(kind, **component_kwargs)
    images = _generate(pipe, kind)
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is type(pipe)
    assert type(loaded.scheduler) is type(pipe.scheduler)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.scheduler.config) == public(pipe.scheduler.config)
    # another model instance: PyTorch promises equal floats only within one instance (AMD and Intel CPUs differ by
    # about 1e-6 here); a real change of the weights or the scheduler moves pixels by far more
    np.testing.assert_allclose(_generate(loaded, kind), images, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", TEXT_KINDS)
def test_lora_weights_save_and_load(kind, tmp_path):
    """A LoRA saved with the pipeline's ``save_lora_weights`` loads into a fresh pipeline unchanged."""
    from peft import get_peft_model_state_dict

    _, denoiser_name = KINDS[kind]
    pipe = tiny_pipeline(kind, lora_rank=4)
    images = _generate(pipe, kind)
    assert np.abs(images - _generate(tiny_pipeline(kind), kind)).max() > 1e-4, "LoRA has no effect"
    layers = get_peft_model_state_dict(getattr(pipe, denoiser_name))
    type(pipe).save_lora_weights(tmp_path, **{f"{denoiser_name}_lora_layers": layers})
    fresh = tiny_pipeline(kind)
    fresh.load_lora_weights(tmp_path)
    np.testing.assert_allclose(_generate(fresh, kind), images, rtol=0, atol=1e-5)  # another instance: see above


def test_kind_aliases_and_default_classes():
    import diffusers

    assert PIPELINE_KINDS == ("ddpm", "stable-diffusion", "sd3", "sdxl", "flux")
    for alias in ("sdxl", "stable-diffusion-xl", "stable_diffusion_xl"):
        assert type(tiny_pipeline(alias)) is diffusers.StableDiffusionXLPipeline
    assert type(tiny_pipeline("flux")) is diffusers.FluxPipeline
    with pytest.raises(ValueError, match="kind must be one of"):
        tiny_pipeline("flux-2")


def test_sdxl_components_and_encode_prompt(tmp_path):
    components = tiny_sdxl_components(prediction_type="v_prediction", tokenizer_dir=tmp_path)
    assert (tmp_path / "tokenizer" / "vocab.json").exists() and (tmp_path / "tokenizer_2" / "vocab.json").exists()
    unet, vae, scheduler = components["unet"], components["vae"], components["scheduler"]
    assert type(scheduler).__name__ == "EulerDiscreteScheduler"
    assert scheduler.config.prediction_type == "v_prediction"
    assert (scheduler.config.beta_schedule, scheduler.config.timestep_spacing) == ("scaled_linear", "leading")
    assert vae.config.scaling_factor == 0.13025
    assert unet.config.addition_embed_type == "text_time" and unet.config.cross_attention_dim == 64
    assert components["text_encoder_2"].config.projection_dim == 32
    assert components["image_encoder"] is None and components["feature_extractor"] is None

    pipe = tiny_pipeline("sdxl")
    assert (pipe.vae_scale_factor, pipe.default_sample_size) == (2, 16)
    prompt_embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        "a red circle", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    assert prompt_embeds.shape == (1, 77, 64) and pooled.shape == (1, 32)
    assert negative is None and negative_pooled is None
    # the default size is 32x32
    images = pipe("a red circle", num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 32, 32, 3)


def test_flux_components_and_encode_prompt(tmp_path):
    components = tiny_flux_components(guidance_embeds=True, tokenizer_dir=tmp_path)
    assert (tmp_path / "tokenizer" / "vocab.json").exists() and (tmp_path / "tokenizer_2" / "tokenizer.json").exists()
    transformer, vae, scheduler = components["transformer"], components["vae"], components["scheduler"]
    assert transformer.config.guidance_embeds
    assert transformer.config.in_channels == 4 * vae.config.latent_channels
    assert sum(transformer.config.axes_dims_rope) == transformer.config.attention_head_dim
    assert transformer.config.joint_attention_dim == components["text_encoder_2"].config.d_model
    assert transformer.config.pooled_projection_dim == components["text_encoder"].config.hidden_size
    assert type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert {k: scheduler.config[k] for k in FLUX_SCHEDULER_CONFIG} == FLUX_SCHEDULER_CONFIG
    assert not tiny_flux_components()["transformer"].config.guidance_embeds

    pipe = tiny_pipeline("flux")
    assert (pipe.vae_scale_factor, pipe.default_sample_size) == (1, 128)
    prompt_embeds, pooled, text_ids = pipe.encode_prompt(
        "a red circle", prompt_2=None, device="cpu", max_sequence_length=512
    )
    assert prompt_embeds.shape == (1, 512, 32) and pooled.shape == (1, 32) and text_ids.shape == (512, 3)
    # 2x2 packing: any multiple of 2 works, also non-square
    images = pipe("a red circle", num_inference_steps=2, height=16, width=24, output_type="np").images
    assert images.shape == (1, 16, 24, 3)


def test_prediction_type_and_scheduler_options():
    sd = tiny_stable_diffusion_components(prediction_type="v_prediction", scheduler="pndm")
    assert type(sd["scheduler"]).__name__ == "PNDMScheduler"
    assert sd["scheduler"].config.prediction_type == "v_prediction"
    sd = tiny_stable_diffusion_components()
    assert type(sd["scheduler"]).__name__ == "DDIMScheduler"
    assert sd["text_encoder"].config.vocab_size == len(sd["tokenizer"])
    assert sd["text_encoder"].config.eos_token_id == sd["tokenizer"].eos_token_id
    ddpm = tiny_ddpm_components(in_channels=1, sample_size=8, prediction_type="sample")
    assert ddpm["unet"].config.in_channels == 1 and ddpm["unet"].config.sample_size == 8
    assert ddpm["scheduler"].config.prediction_type == "sample"


@pytest.mark.parametrize("kind", list(KINDS))
def test_same_seed_same_weights(kind, tmp_path):
    build = BUILDERS[kind]
    extra = {} if kind == "ddpm" else {"tokenizer_dir": tmp_path}
    torch.manual_seed(123)  # the global RNG state must not matter ...
    a = _modules(build(seed=0, **extra))
    torch.rand(7)
    b = _modules(build(seed=0, **extra))
    c = _modules(build(seed=1, **extra))
    assert a.keys() == b.keys() and len(a) >= 1
    differs = False
    for name in a:
        sa, sb, sc = a[name].state_dict(), b[name].state_dict(), c[name].state_dict()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}.{key} differs for the same seed"
            differs |= not torch.equal(sa[key], sc[key])
    assert differs, "a different seed should give different weights"


@pytest.mark.parametrize("kind", list(KINDS))
def test_lora_trainable_params_only(kind):
    from peft import get_peft_model_state_dict

    _, denoiser_name = KINDS[kind]
    pipe = tiny_pipeline(kind, lora_rank=4)
    denoiser = getattr(pipe, denoiser_name)
    trainable = {n: p for n, p in denoiser.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert any("lora_A" in n for n in trainable) and any("lora_B" in n for n in trainable)
    for n, p in trainable.items():
        if "lora_A" in n:
            assert p.shape[0] == 4
        else:
            assert p.shape[1] == 4
            assert p.abs().sum() > 0, "LoRA B must be perturbed so the adapter is not a no-op"
    for name, module in _modules(pipe.components).items():
        if module is not denoiser:
            assert not any(p.requires_grad for p in module.parameters()), f"{name} is trainable"
    assert len(get_peft_model_state_dict(denoiser)) == len(trainable)

    # both LoRA matrices get non-zero gradients
    output = denoiser(**_denoiser_inputs(kind, denoiser)).sample
    output.pow(2).mean().backward()
    for n, p in trainable.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{n} got no gradient"

    # seeded: the same seed gives the same adapter
    again = add_lora(tiny_pipeline(kind).components[denoiser_name], rank=4, seed=0)
    again_params = dict(again.named_parameters())
    for n, p in trainable.items():
        assert torch.equal(p.detach(), again_params[n].detach())


def test_add_lora_custom_targets():
    unet = tiny_ddpm_components()["unet"]
    add_lora(unet, rank=2, target_modules=["to_q", "to_v"], seed=3)
    names = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert names and all(("to_q" in n or "to_v" in n) and "lora_" in n for n in names)


# ------------------------------------------------------------------------------------------------
# data sets
# ------------------------------------------------------------------------------------------------


def _pairwise_min_difference(images):
    arrays = [np.asarray(im, dtype=np.float32) for im in images]
    return min(
        np.abs(arrays[i] - arrays[j]).mean() for i in range(len(arrays)) for j in range(i + 1, len(arrays))
    )


def test_caption_dataset():
    from datasets import Image

    data = make_caption_dataset(num_rows=12, size=32, seed=0)
    assert data.column_names == ["image", "text"]
    assert isinstance(data.features["image"], Image)
    rows = list(data)
    assert all(r["image"].mode == "RGB" and r["image"].size == (32, 32) for r in rows)
    texts = [r["text"] for r in rows]
    assert len(set(texts)) == 12
    assert texts[0] == "a red circle on the left"
    assert _pairwise_min_difference([r["image"] for r in rows]) > 3.0

    # deterministic per seed; the seed changes the pixels, never the captions
    again = make_caption_dataset(num_rows=12, size=32, seed=0)
    assert np.array_equal(np.asarray(again[5]["image"]), np.asarray(rows[5]["image"]))
    other = make_caption_dataset(num_rows=12, size=32, seed=1)
    assert other["text"] == texts
    assert not np.array_equal(np.asarray(other[5]["image"]), np.asarray(rows[5]["image"]))

    # many rows: still unique captions
    assert len(set(make_caption_dataset(num_rows=130, size=8)["text"])) == 130


def test_image_dataset():
    data = make_image_dataset(num_rows=12, size=16, seed=0)
    assert data.column_names == ["image"]
    images = data["image"]
    assert all(im.mode == "RGB" and im.size == (16, 16) for im in images)
    assert _pairwise_min_difference(images) > 3.0
    gray = make_image_dataset(num_rows=4, size=16, mode="L")
    assert all(im.mode == "L" for im in gray["image"])
