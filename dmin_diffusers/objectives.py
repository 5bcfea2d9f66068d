"""The training loss of each model family, reproduced from the scheduler configuration.

Only the direction of each per-timestep gradient matters to DMin (gradients are L2-normalised per timestep),
so scalar factors of the loss drop out: the mean reduction, SNR / min-SNR weighting, SD3's ``weighting_scheme``
and its ``precondition_outputs`` variant (which scales the flow-matching loss by ``sigma**2``) all give the same
vectors as the plain objectives below.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler


@dataclass
class NoisedInput:
    """What the denoiser sees at one training timestep, and what it is trained to output."""

    noisy: torch.Tensor
    model_timestep: torch.Tensor
    target: torch.Tensor


def objective_name(scheduler, default: str | None = None) -> str:
    """The training objective of a pipeline's scheduler: the ``prediction_type`` its config names (``epsilon``,
    ``v_prediction`` or ``sample``); a config that names none (a flow-matching scheduler's) trains ``default``, the
    family's declared objective (:attr:`~dmin_diffusers.families.PipelineFamily.training_objective`), else
    ``epsilon``."""
    prediction_type = scheduler.config.get("prediction_type")
    if prediction_type is None:
        return default or "epsilon"
    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"unsupported prediction_type {prediction_type!r} in the scheduler config")
    return prediction_type


class DiffusionObjective:
    """DDPM-style objectives (epsilon, v-prediction, sample) with the training noise schedule."""

    def __init__(self, scheduler_config, name: str):
        # A fresh scheduler: the pipeline's own one has been shrunk by `set_timesteps` at inference.
        self.scheduler = DDPMScheduler.from_config(scheduler_config)
        self.name = name
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)

    def noised(self, latents: torch.Tensor, noise: torch.Tensor, timestep: int) -> NoisedInput:
        t = torch.full((latents.shape[0],), timestep, dtype=torch.long, device=latents.device)
        self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.to(latents.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        if self.name == "epsilon":
            target = noise
        elif self.name == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, t)
        else:
            target = latents
        return NoisedInput(noisy=noisy, model_timestep=t, target=target)


class FlowMatchingObjective:
    """Rectified-flow objective of SD3 and Flux: ``x_t = (1 - sigma) x + sigma * noise``, target ``noise - x``.

    Timestep ``t`` in ``[0, num_train_timesteps)`` picks the ``t``-th smallest training sigma (shift applied),
    so that, as for DDPM, the noise level grows with ``t``.
    """

    name = "flow_matching"

    def __init__(self, scheduler_config):
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        order = torch.argsort(scheduler.sigmas[: self.num_train_timesteps])
        self.sigmas = scheduler.sigmas[order].to(torch.float32)
        self.model_timesteps = scheduler.timesteps[order].to(torch.float32)

    def noised(self, latents: torch.Tensor, noise: torch.Tensor, timestep: int) -> NoisedInput:
        sigma = self.sigmas[timestep].item()
        batch = latents.shape[0]
        model_timestep = self.model_timesteps[timestep].expand(batch).to(latents.device)
        return NoisedInput(
            noisy=(1.0 - sigma) * latents + sigma * noise, model_timestep=model_timestep, target=noise - latents
        )


def make_objective(scheduler, name: str | None = None, default: str | None = None):
    """The objective for a pipeline's scheduler (:func:`objective_name`, with ``default`` for a scheduler config
    that names none); ``name`` overrides the choice."""
    name = name or objective_name(scheduler, default)
    if name == "flow_matching":
        return FlowMatchingObjective(scheduler.config)
    return DiffusionObjective(scheduler.config, name)
