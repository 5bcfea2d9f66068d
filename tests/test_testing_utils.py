"""Tests of the tiny offline pipelines and data sets in ``dmin_diffusers.testing``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dmin_diffusers.testing import (
    add_lora,
    make_caption_dataset,
    make_clip_tokenizer,
    make_image_dataset,
    make_t5_tokenizer,
    tiny_ddpm_components,
    tiny_pipeline,
    tiny_sd3_components,
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
}

BUILDERS = {
    "ddpm": tiny_ddpm_components,
    "stable-diffusion": tiny_stable_diffusion_components,
    "sd3": tiny_sd3_components,
}


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
    return dict(
        hidden_states=torch.randn(1, 4, 8, 8, generator=g),
        timestep=t,
        encoder_hidden_states=torch.randn(1, 7, 32, generator=g),
        pooled_projections=torch.randn(1, 64, generator=g),
    )


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


@pytest.mark.parametrize("kind", list(KINDS))
def test_tiny_pipeline_builds_and_runs_offline(kind):
    shape, denoiser_name = KINDS[kind]
    pipe = tiny_pipeline(kind)
    for name, module in _modules(pipe.components).items():
        assert not module.training, f"{name} is not in eval mode"
    generator = torch.Generator().manual_seed(0)
    kwargs = dict(num_inference_steps=2, generator=generator, output_type="np")
    if kind != "ddpm":
        kwargs["prompt"] = "a red circle on the left"
    images = pipe(**kwargs).images
    assert images.shape == (1, *shape)
    assert np.isfinite(images).all()

    # the prompt reaches the model: different prompts, different images
    if kind != "ddpm":
        kwargs.update(prompt="blue stripes at the top", generator=torch.Generator().manual_seed(0))
        other = pipe(**kwargs).images
        assert np.abs(images - other).max() > 1e-4


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
