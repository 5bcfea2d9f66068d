"""Per-sample loss gradients over the ``T`` timesteps, streamed straight into the sketch.

Each tracked parameter gets a post-accumulate-grad hook that adds its gradient to the sketch and to the
squared norm, then frees it, so at most one parameter's gradient exists at a time and the flattened
gradient is never built.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import DMinConfig
from .families import SD3_DEFAULT_MAX_SEQUENCE_LENGTH, PipelineFamily
from .fingerprints import add_sampled_parameters, float16_bytes, input_models_fingerprint
from .inputs import ImageInput, preprocess_image
from .objectives import make_objective, spread_timesteps
from .sketch import SketchProjector

NamedParameters = list[tuple[str, torch.nn.Parameter]]


def select_tracked_parameters(denoiser: torch.nn.Module, patterns: list[str] | None = None) -> NamedParameters:
    """The parameters whose gradients DMin uses.

    With ``patterns``: every parameter whose name matches one of the ``fnmatch`` patterns. Otherwise the
    LoRA (peft) parameters when the denoiser has adapters (those marked trainable, if any are), else all
    trainable parameters.
    """
    named = list(denoiser.named_parameters())
    if patterns:
        chosen = [(name, p) for name, p in named if any(fnmatch.fnmatchcase(name, pat) for pat in patterns)]
        if not chosen:
            raise ValueError(f"no parameter of the {type(denoiser).__name__} matches {patterns}")
        return chosen
    lora = [(name, p) for name, p in named if ".lora_" in name]
    if lora:
        trainable = [(name, p) for name, p in lora if p.requires_grad]
        return trainable or lora
    trainable = [(name, p) for name, p in named if p.requires_grad]
    if not trainable:
        raise ValueError(
            "the denoiser has no trainable parameters and no LoRA adapter; pass "
            "DMinConfig(tracked_parameters=[...]) with name patterns"
        )
    return trainable


_ADAPTER_NAME = re.compile(r"\.(lora_[AB]|lora_embedding_[AB]|lora_magnitude_vector)\.[^.]+")


def describe_parameters(parameters: NamedParameters) -> list[list]:
    """``[name, shape]`` for each tracked parameter, as recorded in the config.

    The peft adapter name is left out of LoRA names (``...to_q.lora_A.weight``): a training script calls its
    adapter ``default`` and ``load_lora_weights`` calls the same weights ``default_0``.
    """
    return [[_ADAPTER_NAME.sub(r".\1", name), list(p.shape)] for name, p in parameters]


_DIGEST_CHUNK = 1 << 24  # elements hashed at a time, so a large parameter is never copied whole


def parameter_value_digest(parameter: torch.Tensor) -> str | None:
    """A digest of a parameter's values: sha256 (first 16 hex digits) of its shape and its values cast to
    float16 on the CPU.

    The cast makes the digest the same for float32 and float16 copies of the same weights (a float16 copy is
    the same round-to-nearest cast of the float32 values) and on every device. A bfloat16 copy rounds
    differently, so its digest differs. ``None`` for parameters without values (on the ``meta`` device).
    """
    if parameter.device.type == "meta":
        return None
    digest = hashlib.sha256(json.dumps(list(parameter.shape)).encode())
    flat = parameter.detach().reshape(-1)
    for start in range(0, flat.numel(), _DIGEST_CHUNK):
        digest.update(float16_bytes(flat[start : start + _DIGEST_CHUNK]))
    return digest.hexdigest()[:16]


def parameter_digests(parameters: NamedParameters) -> list[str] | None:
    """:func:`parameter_value_digest` of each tracked parameter, or ``None`` if any has no values."""
    digests = [parameter_value_digest(p) for _, p in parameters]
    return None if None in digests else digests


def parameter_fingerprint(description: list[list], digests: list[str] | None = None) -> str:
    """One digest of the tracked parameters: their names and shapes and, when given, their value digests."""
    payload = description if digests is None else [description, digests]
    return hashlib.sha256(json.dumps(payload, separators=(",", ":")).encode()).hexdigest()[:16]


def denoiser_fingerprint(denoiser: torch.nn.Module, tracked: NamedParameters) -> str | None:
    """A cheap fingerprint of the denoiser outside the tracked parameters and the LoRA adapters: every other
    parameter's name and shape, and 16 of its values (evenly spaced, cast to float16 on the CPU as in
    :func:`parameter_value_digest`). Different base checkpoints differ in nearly every value, so a sample is
    enough to tell them apart without hashing gigabytes. peft's ``.base_layer`` is left out of names, so a
    denoiser with and without an adapter has the same base fingerprint. ``None`` if a weight is on ``meta``."""
    tracked_ids = {id(p) for _, p in tracked}
    digest = hashlib.sha256()
    others = ((name, p) for name, p in denoiser.named_parameters() if id(p) not in tracked_ids and ".lora_" not in name)
    return digest.hexdigest()[:16] if add_sampled_parameters(digest, others) else None


def objective_fingerprint(objective, timesteps: list[int]) -> str:
    """A digest of what the training objective does at each recorded timestep: the noisy input, the target and
    the model timestep it produces for a clean value ``x = (1, 0)`` and noise ``(0, 1)`` (so the coefficients of
    ``x`` and of the noise), printed to 6 significant digits. Two schedulers with the same name but another noise
    schedule, shift or prediction type give different fingerprints."""
    latents = torch.tensor([[1.0, 0.0]])
    noise = torch.tensor([[0.0, 1.0]])
    values = [objective.name]
    for timestep in timesteps:
        noised = objective.noised(latents, noise, int(timestep))
        numbers = torch.cat([noised.noisy.reshape(-1), noised.target.reshape(-1), noised.model_timestep.reshape(-1)])
        values.append(" ".join(f"{float(v):.5e}" for v in numbers.float()))
    return hashlib.sha256("\n".join(values).encode()).hexdigest()[:16]


def default_base_model(pipeline) -> str | None:
    """The pipeline's ``name_or_path`` when it is a Hub repository id (a local directory is not recorded)."""
    name = getattr(pipeline, "name_or_path", None)
    if not isinstance(name, str) or not name or os.path.exists(name) or name.count("/") != 1:
        return None
    return name


@dataclass
class PreparedExample:
    """A training row or query as model inputs: clean latents and prompt conditioning."""

    latents: torch.Tensor
    conditioning: dict[str, torch.Tensor]


class GradientSketcher:
    """Computes the ``(T, K)`` DMin vectors of examples for one pipeline and one resolved config."""

    def __init__(self, family: PipelineFamily, config: DMinConfig, code_cache_bytes: int = 1 << 31):
        if not config.is_resolved:
            raise ValueError("the config must be resolved against the pipeline first")
        self.family = family
        self.config = config
        self.parameters = select_tracked_parameters(family.denoiser, config.tracked_parameters)
        self.objective = make_objective(family.pipeline.scheduler, config.objective)
        self.projector = SketchProjector(
            [p.numel() for _, p in self.parameters], config.projection_dim, config.seed, code_cache_bytes
        )
        self._noise: list[torch.Tensor] = []
        self._accumulator: torch.Tensor | None = None
        self._squared_norm: torch.Tensor | None = None

    def prepare(self, image: ImageInput, prompt: str | None) -> PreparedExample:
        """Preprocesses and encodes one (image, prompt) pair exactly as for training rows."""
        pixels = preprocess_image(
            image, self.config.resolution, self.family.image_channels, center_crop=self.config.center_crop
        )
        latents = self.family.encode_image(pixels)
        conditioning = (
            self.family.encode_prompt(prompt, self.config.max_sequence_length) if self.family.takes_prompt else {}
        )
        return PreparedExample(latents=latents, conditioning=conditioning)

    def noise(self, latents: torch.Tensor, position: int = 0) -> torch.Tensor:
        """The fixed noise of the ``position``-th timestep of the config: ``noise_draws`` tensors shaped like one
        latent, drawn on the CPU from the seed so every device gets the same values. With ``noise="shared"``
        every position gets the first draw; with ``"per_timestep"`` position ``i`` gets the ``i``-th draw of
        the same generator (so position 0 is the shared tensor)."""
        shape = (self.config.noise_draws, *latents.shape[1:])
        if not self._noise or self._noise[0].shape != shape:
            generator = torch.Generator("cpu").manual_seed(self.config.seed)
            count = len(self.config.timesteps) if self.config.noise == "per_timestep" else 1
            self._noise = [torch.randn(shape, generator=generator, dtype=torch.float32) for _ in range(count)]
        return self._noise[position if self.config.noise == "per_timestep" else 0].to(latents.device)

    def output(self, example: PreparedExample, position: int) -> torch.Tensor:
        """The scalar whose gradient DMin takes at the ``position``-th timestep: the config's output function of
        the denoiser's prediction for the example noised with the fixed noise, averaged over the noise draws."""
        noise = self.noise(example.latents, position)
        draws = noise.shape[0]
        latents = example.latents.expand(draws, *example.latents.shape[1:])
        conditioning = {key: value.expand(draws, *value.shape[1:]) for key, value in example.conditioning.items()}
        noised = self.objective.noised(latents, noise, self.config.timesteps[position])
        denoiser_dtype = self.family.denoiser.dtype
        prediction = self.family.predict(noised.noisy.to(denoiser_dtype), noised.model_timestep, conditioning).float()
        if self.config.output_function == "squared_norm":
            return prediction.square().sum() / draws
        if self.config.output_function == "mean":
            return prediction.mean()
        return F.mse_loss(prediction, noised.target.float())

    @contextmanager
    def _tracking(self, streaming: bool) -> Iterator[None]:
        """Gradients on for the tracked parameters only; everything restored afterwards."""
        denoiser = self.family.denoiser
        flags = [(p, p.requires_grad) for p in denoiser.parameters()]
        saved_grads = [(p, p.grad) for _, p in self.parameters]
        was_training = denoiser.training
        handles = []
        try:
            denoiser.eval()
            for p, _ in flags:
                p.requires_grad_(False)
            for index, (_, p) in enumerate(self.parameters):
                p.requires_grad_(True)
                p.grad = None
                if streaming:
                    handles.append(p.register_post_accumulate_grad_hook(self._hook(index)))
            with torch.enable_grad():
                yield
        finally:
            for handle in handles:
                handle.remove()
            for p, flag in flags:
                p.requires_grad_(flag)
            for p, grad in saved_grads:
                p.grad = grad
            denoiser.train(was_training)

    def _hook(self, index: int):
        def add_to_sketch(parameter: torch.Tensor) -> None:
            gradient = parameter.grad
            self.projector.accumulate(self._accumulator, index, gradient)
            self._squared_norm += torch.linalg.vector_norm(gradient, dtype=torch.float32).square()
            parameter.grad = None

        return add_to_sketch

    def sketch(self, example: PreparedExample) -> torch.Tensor:
        """The ``(T, K)`` float32 matrix of L2-normalised, compressed gradients (on the CPU)."""
        device = example.latents.device
        self._accumulator = self.projector.new_accumulator(device)
        self._squared_norm = torch.zeros((), dtype=torch.float32, device=device)
        rows = []
        with self._tracking(streaming=True):
            for position in range(len(self.config.timesteps)):
                self._accumulator.zero_()
                self._squared_norm.zero_()
                self.output(example, position).backward()
                sketch = self.projector.finalize(self._accumulator)
                rows.append(sketch / self._squared_norm.sqrt().clamp_min(1e-30))
        return torch.stack(rows).cpu()

    def flat_gradients(self, example: PreparedExample, normalize: bool = True) -> torch.Tensor:
        """The uncompressed ``(T, D)`` gradients (materialised: for tests and baselines on small models)."""
        tensors = [p for _, p in self.parameters]
        rows = []
        with self._tracking(streaming=False):
            for position in range(len(self.config.timesteps)):
                grads = torch.autograd.grad(self.output(example, position), tensors, allow_unused=True)
                flat = torch.cat(
                    [(g if g is not None else torch.zeros_like(p)).reshape(-1).float() for g, p in zip(grads, tensors)]
                )
                rows.append(flat / flat.norm().clamp_min(1e-30) if normalize else flat)
        return torch.stack(rows).cpu()


def resolve_config(config: DMinConfig, family: PipelineFamily) -> DMinConfig:
    """Fills in the fields that come from the pipeline: family, objective, timesteps, resolution, the tracked
    parameters with their value digests and fingerprint, and the denoiser and objective fingerprints. Fields
    already set are kept (and validated)."""
    objective = make_objective(family.pipeline.scheduler, config.objective)
    num_train = objective.num_train_timesteps
    timesteps = config.timesteps or spread_timesteps(config.num_timesteps, num_train, config.timestep_spacing)
    bad = [t for t in timesteps if not 0 <= t < num_train]
    if bad:
        raise ValueError(f"timesteps {bad} are outside the training schedule [0, {num_train})")
    resolution = config.resolution or family.native_resolution()
    factor = int(family.pipeline.vae_scale_factor) if getattr(family.pipeline, "vae", None) is not None else 1
    if resolution % factor:
        raise ValueError(f"resolution {resolution} is not a multiple of the VAE's downsampling factor {factor}")
    tracked = select_tracked_parameters(family.denoiser, config.tracked_parameters)
    description = describe_parameters(tracked)
    digests = parameter_digests(tracked)
    max_sequence_length = config.max_sequence_length
    if family.name == "sd3" and max_sequence_length is None:
        max_sequence_length = SD3_DEFAULT_MAX_SEQUENCE_LENGTH
    return config.replace(
        family=family.name,
        objective=objective.name,
        num_train_timesteps=num_train,
        timesteps=list(timesteps),
        resolution=resolution,
        max_sequence_length=max_sequence_length,
        parameters=description,
        parameter_fingerprint=parameter_fingerprint(description, digests),
        parameter_digests=digests,
        denoiser_fingerprint=denoiser_fingerprint(family.denoiser, tracked),
        input_models_fingerprint=input_models_fingerprint(family.pipeline),
        objective_fingerprint=objective_fingerprint(objective, timesteps),
        denoiser_dtype=str(family.denoiser.dtype).removeprefix("torch."),
        base_model=config.base_model or default_base_model(family.pipeline),
    )


def check_config_matches(index_config: DMinConfig, family: PipelineFamily) -> list[str]:
    """What differs between an index's config and the same config resolved against ``family``'s pipeline."""
    try:
        here = resolve_config(index_config.unresolved(), family)
    except ValueError as error:
        return [str(error)]
    return index_config.differences(here)
