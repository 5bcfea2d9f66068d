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


def objective_name(scheduler) -> str:
    """Picks the training objective from a pipeline's scheduler: flow matching for flow-match schedulers,
    else the config's ``prediction_type`` (``epsilon``, ``v_prediction`` or ``sample``)."""
    if "FlowMatch" in type(scheduler).__name__:
        return "flow_matching"
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
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


def make_objective(scheduler, name: str | None = None):
    """The objective for a pipeline's scheduler; ``name`` overrides the automatic choice."""
    name = name or objective_name(scheduler)
    if name == "flow_matching":
        return FlowMatchingObjective(scheduler.config)
    return DiffusionObjective(scheduler.config, name)


def spread_timesteps(num_timesteps: int, num_train_timesteps: int, spacing: str = "centres") -> list[int]:
    """``T`` distinct training timesteps in ascending order, placed by ``spacing``:

    - ``"centres"``: the centres of ``T`` equal slices of the schedule (the paper's placement);
    - ``"linspace"``: evenly spaced from 0 to ``N - 1``, both ends included (the middle step for ``T = 1``);
    - ``"cubic"``: ``(N - 1)(1 - (i / T)^3)`` for ``i = 1..T``, as the official DMin code places them (dense at
      high noise).
    """
    if num_timesteps > num_train_timesteps:
        raise ValueError(f"num_timesteps ({num_timesteps}) exceeds the schedule's {num_train_timesteps} steps")
    last = num_train_timesteps - 1
    if spacing == "centres":
        values = [int((i + 0.5) * num_train_timesteps / num_timesteps) for i in range(num_timesteps)]
    elif spacing == "linspace":
        values = [round(i * last / (num_timesteps - 1)) for i in range(num_timesteps)] if num_timesteps > 1 else [
            last // 2
        ]
    elif spacing == "cubic":
        values = [round(last * (1 - (i / num_timesteps) ** 3)) for i in range(1, num_timesteps + 1)]
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}")
    values = sorted(values)
    if len(set(values)) != len(values):
        raise ValueError(
            f"{spacing!r} spacing puts some of {num_timesteps} timesteps on the same step of a {num_train_timesteps}-"
            "step schedule; choose fewer timesteps or another spacing"
        )
    return values
