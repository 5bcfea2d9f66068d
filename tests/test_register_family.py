"""The README's worked example of `register_family` (PixArt-α), run as it is written, on a tiny PixArt-α."""

import re
from pathlib import Path

import torch
from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

import dmin_diffusers as dm
from dmin_diffusers.families import detect_family
from tiny_models import add_lora, make_caption_dataset, tiny_sd3_components, tiny_stable_diffusion_components

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_family_example() -> str:
    section = README.read_text(encoding="utf-8").split("### Supporting another pipeline", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def tiny_pixart() -> PixArtAlphaPipeline:
    """PixArt-α from configs: the tiny SD VAE (32x32 images, 16x16 latents) and the tiny SD3 T5 (d_model 32)."""
    sd3, sd = tiny_sd3_components(), tiny_stable_diffusion_components()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = PixArtTransformer2DModel(
            sample_size=16, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2,
            caption_channels=32, in_channels=4, out_channels=8, cross_attention_dim=16, attention_bias=True,
            activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
            norm_elementwise_affine=False, norm_eps=1e-6,
        ).eval()
    pipe = PixArtAlphaPipeline(tokenizer=sd3["tokenizer_3"], text_encoder=sd3["text_encoder_3"], vae=sd["vae"],
                               transformer=transformer, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_readme_example_adds_pixart_alpha(tmp_path):
    pipe = tiny_pixart()
    # a LoRA, as PixArt-α is fine-tuned (with every parameter of this random tiny DiT tracked, the rows' gradients
    # are nearly parallel: self-retrieval then rests on margins of 1e-4)
    add_lora(pipe.transformer, rank=4)
    exec(compile(readme_family_example(), str(README), "exec"), {})  # registers the family, as a user's code would
    assert detect_family(pipe).name == "pixart-alpha"
    pipe = dm.enable_attribution(pipe)
    assert type(pipe).__name__ == "DMinPixArtAlphaPipeline"

    data = make_caption_dataset(10)
    index = pipe.build_attribution_index(
        data, tmp_path / "index", config=dm.DMinConfig(num_timesteps=4, projection_dim=1024), progress=False
    )
    assert index.config.family == "pixart-alpha" and index.config.max_sequence_length == 120
    assert index.config.resolution == 32
    for exact in (True, False):
        results = pipe.attribute([row["image"] for row in data], [row["text"] for row in data], top_k=2, exact=exact)
        assert [result.indices[0] for result in results] == list(range(len(data)))
