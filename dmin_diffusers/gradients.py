"""Per-sample loss gradients over the ``T`` timesteps, streamed straight into the sketch.

Each tracked parameter gets a post-accumulate-grad hook that adds its gradient to the sketch and to the
squared norm, then frees it, so at most one parameter's gradient exists at a time and the flattened
gradient is never built.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import DMinConfig
from .families import SD3_DEFAULT_MAX_SEQUENCE_LENGTH, PipelineFamily
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


def describe_parameters(parameters: NamedParameters) -> list[list]:
    """``[name, shape]`` for each tracked parameter, as recorded in the config."""
    return [[name, list(p.shape)] for name, p in parameters]


def parameter_fingerprint(description: list[list]) -> str:
    return hashlib.sha256(json.dumps(description, separators=(",", ":")).encode()).hexdigest()[:16]


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
        self._noise: torch.Tensor | None = None
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

    def noise(self, latents: torch.Tensor) -> torch.Tensor:
        """The one fixed noise tensor, drawn on the CPU from the seed so every device gets the same values."""
        if self._noise is None or self._noise.shape != latents.shape:
            generator = torch.Generator("cpu").manual_seed(self.config.seed)
            self._noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
        return self._noise.to(latents.device)

    def _loss(self, example: PreparedExample, timestep: int) -> torch.Tensor:
        noised = self.objective.noised(example.latents, self.noise(example.latents), timestep)
        denoiser_dtype = self.family.denoiser.dtype
        prediction = self.family.predict(
            noised.noisy.to(denoiser_dtype), noised.model_timestep, example.conditioning
        )
        return F.mse_loss(prediction.float(), noised.target.float())

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
            for timestep in self.config.timesteps:
                self._accumulator.zero_()
                self._squared_norm.zero_()
                self._loss(example, timestep).backward()
                sketch = self.projector.finalize(self._accumulator)
                rows.append(sketch / self._squared_norm.sqrt().clamp_min(1e-30))
        return torch.stack(rows).cpu()

    def flat_gradients(self, example: PreparedExample, normalize: bool = True) -> torch.Tensor:
        """The uncompressed ``(T, D)`` gradients (materialised: for tests and baselines on small models)."""
        tensors = [p for _, p in self.parameters]
        rows = []
        with self._tracking(streaming=False):
            for timestep in self.config.timesteps:
                grads = torch.autograd.grad(self._loss(example, timestep), tensors, allow_unused=True)
                flat = torch.cat(
                    [(g if g is not None else torch.zeros_like(p)).reshape(-1).float() for g, p in zip(grads, tensors)]
                )
                rows.append(flat / flat.norm().clamp_min(1e-30) if normalize else flat)
        return torch.stack(rows).cpu()


def resolve_config(config: DMinConfig, family: PipelineFamily) -> DMinConfig:
    """Fills in the fields that come from the pipeline: family, objective, timesteps, resolution and the
    tracked parameters with their fingerprint. Fields already set are kept (and validated)."""
    objective = make_objective(family.pipeline.scheduler, config.objective)
    num_train = objective.num_train_timesteps
    timesteps = config.timesteps or spread_timesteps(config.num_timesteps, num_train)
    bad = [t for t in timesteps if not 0 <= t < num_train]
    if bad:
        raise ValueError(f"timesteps {bad} are outside the training schedule [0, {num_train})")
    description = describe_parameters(select_tracked_parameters(family.denoiser, config.tracked_parameters))
    max_sequence_length = config.max_sequence_length
    if family.name == "sd3" and max_sequence_length is None:
        max_sequence_length = SD3_DEFAULT_MAX_SEQUENCE_LENGTH
    return config.replace(
        family=family.name,
        objective=objective.name,
        num_train_timesteps=num_train,
        timesteps=list(timesteps),
        resolution=config.resolution or family.native_resolution(),
        max_sequence_length=max_sequence_length,
        parameters=description,
        parameter_fingerprint=parameter_fingerprint(description),
    )


def check_config_matches(index_config: DMinConfig, family: PipelineFamily) -> list[str]:
    """What differs between an index's config and the same config resolved against ``family``'s pipeline."""
    try:
        here = resolve_config(index_config.unresolved(), family)
    except ValueError as error:
        return [str(error)]
    return index_config.differences(here)
