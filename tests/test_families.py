"""The family registry (detection by class, refusal of unknown pipelines, registering a new family) and, for SDXL
and Flux, the objective checked against the formulas of diffusers' own training scripts."""

import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    DDIMPipeline,
    DDPMPipeline,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    LDMPipeline,
    StableDiffusionPipeline,
    UNet2DModel,
    VQModel,
)

import dmin_diffusers as dm
from dmin_diffusers.families import PipelineFamily, detect_family, family_named, register_family
from dmin_diffusers.gradients import GradientSketcher
from dmin_diffusers.inputs import preprocess_image
from dmin_diffusers.resolution import resolve_config
from tiny_models import make_caption_dataset, tiny_pipeline


def sketcher_for(pipe, **fields):
    family = detect_family(pipe)
    config = resolve_config(dm.DMinConfig.paper(num_timesteps=3, projection_dim=256, **fields), family)
    return GradientSketcher(family, config)


# ---------------------------------------------------------------------------------------------- the registry


@pytest.mark.parametrize("kind", ["ddpm", "stable-diffusion", "sdxl", "sd3", "flux"])
def test_each_shipped_family_serves_its_pipeline_and_subclasses(kind):
    pipe = tiny_pipeline(kind)
    diffusers_class, family = type(pipe), detect_family(pipe)
    assert family.name == kind
    assert dm.enable_attribution(pipe).__class__ is family.ready_made  # the ready-made class, not a new one
    assert type(pipe).__name__ == f"DMin{diffusers_class.__name__}"

    class MyPipeline(diffusers_class):  # a user's subclass of the diffusers class
        pass

    assert detect_family(tiny_pipeline(kind, pipeline_class=MyPipeline)).name == kind


def test_flux_is_not_taken_for_sd3_and_ldm_is_not_taken_for_ddpm():
    assert detect_family(tiny_pipeline("flux")).name == "flux"  # it has a transformer, a VAE and text_encoder_2
    ldm = LDMPipeline(
        vqvae=VQModel(block_out_channels=(8,), norm_num_groups=4, latent_channels=3),
        unet=UNet2DModel(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4,
                         down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2),
        scheduler=tiny_pipeline("ddpm").scheduler,
    )
    with pytest.raises(TypeError, match="LDMPipeline is not supported.*register_family"):
        detect_family(ldm)
    with pytest.raises(TypeError, match="LDMPipeline is not supported"):
        dm.enable_attribution(ldm)
    assert detect_family(DDIMPipeline(unet=ldm.unet, scheduler=ldm.scheduler)).name == "ddpm"


def test_register_family_refuses_clashes():
    with pytest.raises(TypeError, match="PipelineFamily subclass"):
        register_family(object)

    class Nameless(PipelineFamily):
        pipeline_classes = (LDMPipeline,)

    with pytest.raises(ValueError, match="must set `name`"):
        register_family(Nameless)

    class SameName(PipelineFamily):
        name = "sdxl"
        pipeline_classes = (LDMPipeline,)

    with pytest.raises(ValueError, match="named 'sdxl' is already registered"):
        register_family(SameName)

    class Taken(PipelineFamily):
        name = "my-ddpm"
        pipeline_classes = (DDPMPipeline,)

    with pytest.raises(ValueError, match="DDPMPipeline already belong"):
        register_family(Taken)
    assert family_named("my-ddpm") is None and family_named("sdxl").ready_made is dm.DMinStableDiffusionXLPipeline


def test_every_ready_made_class_is_exported():
    for family in dm.registered_families():
        assert getattr(dm, family.ready_made.__name__) is family.ready_made
        assert family.ready_made.__name__ in dm.__all__
        assert issubclass(family.ready_made, dm.InfluenceMixin)
        assert any(issubclass(family.ready_made, cls) for cls in family.pipeline_classes)


# ---------------------------------------------------------------------------------------------- SDXL


def sdxl_script_prompt(pipe, prompt):
    """train_text_to_image_lora_sdxl.py's `encode_prompt`: the penultimate hidden states of both text encoders,
    concatenated, and the pooled (projected) output of the second."""
    embeds = []
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        output = encoder(ids, output_hidden_states=True, return_dict=False)
        pooled = output[0]
        embeds.append(output[-1][-2])
    return torch.cat(embeds, dim=-1), pooled


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sdxl_loss_is_the_training_scripts(prediction_type):
    pipe = tiny_pipeline("sdxl", lora_rank=4, prediction_type=prediction_type)
    sketcher = sketcher_for(pipe)
    image = make_caption_dataset(1, size=48)[0]["image"].crop((0, 0, 40, 48))  # 40 wide, 48 high: a crop
    prompt = "a red circle on the left"
    example = sketcher.prepare(image, prompt)
    # the script: original_size = (h, w); Resize(32) makes 32x38; the center crop starts at y1 = 3, x1 = 0
    assert example.conditioning["time_ids"].tolist() == [[48, 40, 3, 0, 32, 32]]

    with torch.no_grad():
        pixels = preprocess_image(image, 32)
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        prompt_embeds, pooled = sdxl_script_prompt(pipe, prompt)
        time_ids = torch.tensor([[48.0, 40.0, 3.0, 0.0, 32.0, 32.0]])
        for position, timestep in enumerate(sketcher.config.timesteps):
            noise = sketcher.noise(latents, position)
            training = DDPMScheduler.from_config(pipe.scheduler.config)  # the script's noise_scheduler
            t = torch.tensor([timestep])
            noisy = training.add_noise(latents, noise, t)
            target = noise if prediction_type == "epsilon" else training.get_velocity(latents, noise, t)
            prediction = pipe.unet(noisy, t, prompt_embeds, added_cond_kwargs={"time_ids": time_ids,
                                                                                "text_embeds": pooled}).sample
            expected = F.mse_loss(prediction.float(), target.float(), reduction="mean")
            torch.testing.assert_close(sketcher.output(example, position), expected, rtol=1e-5, atol=1e-7)


def test_a_generated_sdxl_image_is_conditioned_on_its_own_size():
    pipe = tiny_pipeline("sdxl", lora_rank=4)
    sketcher = sketcher_for(pipe)
    example = sketcher.prepare(PIL.Image.new("RGB", (32, 32), "red"), "a red square")
    assert example.conditioning["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]]  # what the pipeline used


# ---------------------------------------------------------------------------------------------- Flux


@pytest.mark.parametrize("guidance_embeds", [False, True])
def test_flux_loss_is_the_training_scripts(guidance_embeds):
    """train_dreambooth_lora_flux.py: sigmas of a copy of the scheduler, packed latents and their ids, the
    transformer at timestep / 1000 (with the guidance value when it has a guidance embedding), the prediction
    unpacked and compared with noise - latents."""
    pipe = tiny_pipeline("flux", lora_rank=4, guidance_embeds=guidance_embeds)
    sketcher = sketcher_for(pipe, resolution=32)
    assert sketcher.config.guidance_scale == (3.5 if guidance_embeds else None)
    assert sketcher.config.max_sequence_length == 512
    image, prompt = make_caption_dataset(1)[0]["image"], "a red circle on the left"
    example = sketcher.prepare(image, prompt)

    copy = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)  # the script's noise_scheduler_copy
    with torch.no_grad():
        vae = pipe.vae
        latents = vae.encode(preprocess_image(image, 32)).latent_dist.mean
        latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
        prompt_embeds, pooled, text_ids = pipe.encode_prompt(prompt, prompt_2=None, max_sequence_length=512)
        batch, channels, height, width = latents.shape
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, "cpu", torch.float32)
        guidance = torch.tensor([3.5]).expand(batch) if guidance_embeds else None
        for position, timestep in enumerate(sketcher.config.timesteps):
            index = copy.config.num_train_timesteps - 1 - timestep  # t-th smallest sigma: the noise grows with t
            timesteps, sigma = copy.timesteps[index][None], copy.sigmas[index]
            noise = sketcher.noise(latents, position)
            noisy = (1.0 - sigma) * latents + sigma * noise
            packed = FluxPipeline._pack_latents(noisy, batch, channels, height, width)
            prediction = pipe.transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                                          pooled_projections=pooled, encoder_hidden_states=prompt_embeds,
                                          txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
            scale = pipe.vae_scale_factor
            prediction = FluxPipeline._unpack_latents(prediction, height * scale, width * scale, scale)
            expected = F.mse_loss(prediction.float(), (noise - latents).float(), reduction="mean")
            torch.testing.assert_close(sketcher.output(example, position), expected, rtol=1e-5, atol=1e-7)


def test_flux_guidance_and_resolution_are_checked():
    pipe = tiny_pipeline("flux", lora_rank=4, guidance_embeds=True)
    family = detect_family(pipe)
    assert resolve_config(dm.DMinConfig(guidance_scale=1.0, resolution=32), family).guidance_scale == 1.0
    assert family.native_resolution() == 128  # default_sample_size x the VAE's factor, as the pipeline generates
    with pytest.raises(ValueError, match="resolution 33 is not a multiple of 2"):
        resolve_config(dm.DMinConfig(resolution=33), family)
    with pytest.raises(ValueError, match="guidance_scale"):
        dm.DMinConfig(guidance_scale=-1.0)
    sd = detect_family(tiny_pipeline("stable-diffusion", lora_rank=4))
    assert resolve_config(dm.DMinConfig(guidance_scale=3.0), sd).guidance_scale is None  # only Flux uses it


def test_a_flux_index_of_another_guidance_value_is_refused(tmp_path):
    pipe = tiny_pipeline("flux", pipeline_class=dm.DMinFluxPipeline, lora_rank=4, guidance_embeds=True)
    data = make_caption_dataset(3)
    config = dm.DMinConfig(num_timesteps=2, projection_dim=64, resolution=32, guidance_scale=2.0)
    pipe.build_attribution_index(data, tmp_path / "index", config=config, progress=False)
    assert pipe.attribute(data[1]["image"], data[1]["text"], top_k=1).indices == [1]
    other = tiny_pipeline("flux", pipeline_class=dm.DMinFluxPipeline, lora_rank=4, guidance_embeds=False)
    with pytest.raises(ValueError, match="guidance_scale: 2.0 != None"):
        other.load_attribution_index(tmp_path / "index")


def test_stable_diffusion_families_are_told_apart():
    sd, sdxl = tiny_pipeline("stable-diffusion"), tiny_pipeline("sdxl")
    assert isinstance(sd, StableDiffusionPipeline) and detect_family(sdxl).name == "sdxl"
