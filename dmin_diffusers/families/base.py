"""What every pipeline family provides: how an image and a prompt become the denoiser's inputs, the training
objective, and the prediction call. One subclass per family, registered with
:func:`~dmin_diffusers.families.register_family`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..config import DMinConfig
from ..fingerprints import DEFAULT_INPUT_MODELS
from ..inputs import CropGeometry, ImageInput, preprocess_with_geometry
from ..objectives import make_objective


@dataclass
class PreparedExample:
    """A training row or query as model inputs: clean latents and prompt conditioning."""

    latents: torch.Tensor
    conditioning: dict[str, torch.Tensor]


class PipelineFamily:
    """How DMin runs one family of diffusers pipelines exactly as its training scripts train it.

    A subclass sets the class attributes below and overrides :meth:`encode_image`, :meth:`predict` and, for
    text-to-image models, :meth:`encode_prompt`; :meth:`prepare` puts them together for a row or a query.
    ``conditioning`` tensors have a batch dimension of 1; DMin batches and repeats them along it.

    Attributes:
        name: the family's name, recorded in index configs (``"stable-diffusion"``, ``"sdxl"``, ...).
        pipeline_classes: the diffusers pipeline classes it serves (subclasses included).
        ready_made: the ``DMin...Pipeline`` class with attribution built in, if the family has one (the shipped
            families' are registered by :mod:`dmin_diffusers.pipelines`, see
            :func:`~dmin_diffusers.families.register_ready_made`).
        denoiser_name: the pipeline component that is trained (``"unet"`` or ``"transformer"``).
        takes_prompt: whether images come with a prompt (``False`` for unconditional models).
        training_objective: the objective the family's models are trained with when the scheduler config names
            none (a flow-matching scheduler has no ``prediction_type``): ``"flow_matching"`` for SD3 and Flux;
            ``None`` means epsilon. A ``prediction_type`` in the scheduler config always wins.
        input_models: the pipeline components that turn an (image, prompt) into the denoiser's inputs, as
            ``fnmatch`` patterns of component names (by default the VAE, text encoders and tokenizers); their
            weights and vocabularies are fingerprinted into the index config and checked at every query.
        default_max_sequence_length: the T5 prompt length of the family's training scripts (T5 families only).
        default_preconditioning: ``DMinConfig.preconditioning`` when the config leaves it unset, chosen per kind of
            model on the detection benchmark's selection queries (``benchmarks/results/quality.md``, "Choice of the
            default preconditioning"): ``"none"`` for pixel-space models, ``"centered"`` for latent ones.
        training_scripts: diffusers' training scripts for the family (for the documentation).
    """

    name: ClassVar[str] = ""
    pipeline_classes: ClassVar[tuple[type, ...]] = ()
    ready_made: ClassVar[type | None] = None
    denoiser_name: ClassVar[str] = "unet"
    takes_prompt: ClassVar[bool] = True
    training_objective: ClassVar[str | None] = None
    input_models: ClassVar[tuple[str, ...]] = DEFAULT_INPUT_MODELS
    default_max_sequence_length: ClassVar[int | None] = None
    default_preconditioning: ClassVar[str] = "none"
    training_scripts: ClassVar[tuple[str, ...]] = ()

    def __init__(self, pipeline: Any):
        self.pipeline = pipeline

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipeline, self.denoiser_name)

    @property
    def device(self) -> torch.device:
        device = getattr(self.pipeline, "_execution_device", None)
        return torch.device(device) if device is not None else next(self.denoiser.parameters()).device

    @property
    def image_channels(self) -> int:
        return 3

    @property
    def resolution_multiple(self) -> int:
        """Image sizes must be a multiple of this (the VAE's downsampling factor)."""
        return 1

    def native_resolution(self) -> int:
        """The image size the model was trained at, when the config does not give one."""
        raise NotImplementedError

    def resolved_settings(self, config: DMinConfig) -> dict[str, Any]:
        """Config fields whose defaults depend on the family (the T5 prompt length, the guidance value, the
        preconditioning)."""
        return {"max_sequence_length": config.max_sequence_length or self.default_max_sequence_length,
                "guidance_scale": None,
                "preconditioning": config.preconditioning or self.default_preconditioning}

    def objective(self, name: str | None = None):
        """The training objective, from the pipeline's scheduler config, else :attr:`training_objective`
        (``name`` overrides the choice)."""
        return make_objective(self.pipeline.scheduler, name, self.training_objective)

    def prepare(self, image: ImageInput, prompt: str | None, config: DMinConfig) -> PreparedExample:
        """One (image, prompt) pair as model inputs, preprocessed as the training scripts do."""
        pixels, geometry = preprocess_with_geometry(image, config.resolution, self.image_channels, config.center_crop,
                                                    config.image_interpolation_mode)
        conditioning = self.encode_prompt(prompt, geometry, config) if self.takes_prompt else {}
        return PreparedExample(latents=self.encode_image(pixels), conditioning=conditioning)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(1, C, H, W)`` pixels in ``[-1, 1]`` to the clean input the denoiser is trained to restore."""
        raise NotImplementedError

    def encode_prompt(self, prompt: str, geometry: CropGeometry, config: DMinConfig) -> dict[str, torch.Tensor]:
        """The prompt (and, for models conditioned on it, the image's crop ``geometry``) as keyword tensors for
        :meth:`predict`."""
        return {}

    def predict(self, noisy: torch.Tensor, timestep: torch.Tensor, conditioning: dict[str, torch.Tensor]):
        """The denoiser's prediction for ``noisy`` (shaped like the clean input) at the objective's timestep."""
        raise NotImplementedError


def sample_size(config: Any) -> int:
    """A model config's ``sample_size`` as one integer."""
    size = config.sample_size
    return int(size[0] if isinstance(size, (list, tuple)) else size)


class LatentFamily(PipelineFamily):
    """Latent diffusion: images go through the VAE (latent mean, shifted and scaled as the training scripts do)."""

    default_preconditioning = "centered"

    @property
    def resolution_multiple(self) -> int:
        return int(self.pipeline.vae_scale_factor)

    def native_resolution(self) -> int:
        return sample_size(self.denoiser.config) * int(self.pipeline.vae_scale_factor)

    @torch.no_grad()
    def encode_image(self, pixels):
        vae = self.pipeline.vae
        # The mean of the latent distribution: the training scripts' `.sample()` would change a row's
        # influence from run to run.
        latents = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist.mean.float()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor
