"""Per-sample gradients over the ``T`` timesteps, compressed into the sketch.

Three paths give the same vectors (to float tolerance). Per layer (the default where every tracked parameter is
a weight or bias of a linear, convolution or normalisation layer, LoRA included): one plain batched forward and
backward, each sample's gradient contracted per layer from the layer's input and output gradient
(:mod:`~dmin_diffusers.per_layer`). Batched with ``torch.func``: the samples go through one
``vmap(grad(...))`` call. One at a time: each tracked parameter gets a post-accumulate-grad hook that adds its
gradient to the sketch and to the squared norm, then frees it, so at most one parameter's gradient exists at a
time. The flattened gradient is never built on any path.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import DMinConfig
from .families.base import PipelineFamily, PreparedExample
from .inputs import ImageInput
from .model_state import model_lock
from .output_functions import output_function_named
from .per_layer import LayerRecorder, plan_layers
from .resolution import select_tracked_parameters
from .sketch import SketchProjector

logger = logging.getLogger(__name__)


def _exclusive(method):
    """Runs a :class:`GradientSketcher` method under its denoiser's :func:`~dmin_diffusers.model_state.model_lock`:
    gradients flag, and ``vmap`` swaps, the parameters of the shared module, and the sketcher keeps per-call state,
    so two threads must never compute at once."""

    @functools.wraps(method)
    def holding_the_model_lock(self, *args, **kwargs):
        with model_lock(self.family.denoiser):
            return method(self, *args, **kwargs)

    return holding_the_model_lock


@dataclass
class _DenoiserInputs:
    """One (example, timestep) sample noised with the fixed noise: ``noise_draws`` copies of each input."""

    noisy: torch.Tensor
    model_timestep: torch.Tensor
    conditioning: dict[str, torch.Tensor]
    target: torch.Tensor


class _Prediction(torch.nn.Module):
    """The family's prediction call as a module, so ``torch.func.functional_call`` can swap the tracked
    parameters (named ``denoiser.<name>``) for the ones being differentiated."""

    def __init__(self, family: PipelineFamily):
        super().__init__()
        self.denoiser = family.denoiser
        self._predict = family.predict

    def forward(self, noisy: torch.Tensor, model_timestep: torch.Tensor, conditioning: dict[str, torch.Tensor]):
        return self._predict(noisy.to(self.denoiser.dtype), model_timestep, conditioning).float()


#: default memory budget of one batched backward (per-sample gradients plus the activations kept for backward)
DEFAULT_BATCH_BYTES = 1 << 30
#: at most this many (row, timestep) samples per batched backward: beyond it the CPU gains nothing measurable
MAX_BATCH_SAMPLES = 128
#: per-sample gradients of parameters smaller than this (elements per sample) are sketched together
SKETCH_GROUP_ELEMENTS = 1 << 16
#: ways of computing per-sample gradients in a batch (``GradientSketcher(per_sample=...)``)
PER_SAMPLE_PATHS = ("auto", "per-layer", "vmap")
#: the per-layer path is kept when its first example's vectors have at least this cosine with the one-at-a-time
#: path's (a layer used outside its own forward, or a batch split the rules do not expect, falls far below)
PER_LAYER_AGREEMENT = 0.9999


class GradientSketcher:
    """Computes the ``(T, K)`` DMin vectors of examples for one pipeline and one resolved config.

    The ``T`` timesteps of an example (and several examples, see :meth:`sketch_many`) are differentiated in one
    batched forward and backward, each sample's gradient sketched and normalised on its own. ``per_sample``
    picks how the batch's per-sample gradients are formed: ``"per-layer"`` contracts each layer's input with its
    output gradient (:mod:`~dmin_diffusers.per_layer`), ``"vmap"`` uses ``torch.func``; ``"auto"`` (default)
    takes the per-layer path where it covers every tracked parameter and its first example agrees with the
    one-at-a-time path, else ``vmap``. ``batch_bytes`` bounds the memory of one batch (measured on the first
    example); ``0``, or a model that neither path can batch, takes the one-at-a-time path
    (:meth:`sketch_sequential`), whose memory is one gradient of one parameter.
    """

    def __init__(
        self,
        family: PipelineFamily,
        config: DMinConfig,
        code_cache_bytes: int | None = None,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
        projector: SketchProjector | None = None,
        per_sample: str = "auto",
    ):
        if not config.is_resolved:
            raise ValueError("the config must be resolved against the pipeline first")
        if batch_bytes < 0:
            raise ValueError(f"batch_bytes must be >= 0, got {batch_bytes}")
        if per_sample not in PER_SAMPLE_PATHS:
            raise ValueError(f"per_sample must be one of {PER_SAMPLE_PATHS}, got {per_sample!r}")
        self.family = family
        self.config = config
        self.parameters = select_tracked_parameters(family.denoiser, config.tracked_parameters)
        self.objective = family.objective(config.objective)
        self._output_function = output_function_named(config.output_function).function
        sizes = [p.numel() for _, p in self.parameters]
        if projector is None or (projector.parameter_sizes, projector.dim, projector.seed) != (
            sizes, config.projection_dim, config.seed
        ):
            projector = SketchProjector(sizes, config.projection_dim, config.seed, code_cache_bytes)
        self.projector = projector  # ``projector``: one made before for the same sizes, whose codes are reused
        self.batch_bytes = batch_bytes
        self._batch_samples: int | None = None if batch_bytes else 1
        plan = None if per_sample == "vmap" else plan_layers(family.denoiser, [name for name, _ in self.parameters])
        if plan is None and per_sample == "per-layer":
            raise ValueError("per_sample='per-layer': a tracked parameter is not the weight or bias of a linear, "
                             "convolution or normalisation layer")
        self._recorder = None if plan is None else LayerRecorder(plan)
        self._per_layer_checked = per_sample == "per-layer"  # "auto" compares its first example once
        self._prediction = _Prediction(family)
        self._noise: list[torch.Tensor] = []
        self._accumulator: torch.Tensor | None = None
        self._squared_norm: torch.Tensor | None = None

    @property
    def batch_samples(self) -> int:
        """Samples per batched backward: measured on the first example sketched (1 until then, and on the
        one-at-a-time path)."""
        return self._batch_samples or 1

    def prepare(self, image: ImageInput, prompt: str | None) -> PreparedExample:
        """Preprocesses and encodes one (image, prompt) pair exactly as for training rows."""
        return self.family.prepare(image, prompt, self.config)

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

    def _inputs(self, example: PreparedExample, position: int) -> _DenoiserInputs:
        noise = self.noise(example.latents, position)
        draws = noise.shape[0]
        latents = example.latents.expand(draws, *example.latents.shape[1:])
        conditioning = {key: value.expand(draws, *value.shape[1:]) for key, value in example.conditioning.items()}
        noised = self.objective.noised(latents, noise, self.config.timesteps[position])
        return _DenoiserInputs(noised.noisy, noised.model_timestep, conditioning, noised.target.float())

    def _reduce(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The output function of a prediction of ``noise_draws`` copies, averaged over the draws."""
        return self._reduce_samples(prediction[None], target[None])[0]

    def _reduce_samples(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """:meth:`_reduce` of each sample of ``(samples, noise_draws, ...)`` predictions: ``(samples,)``, the
        config's registered output function (:mod:`~dmin_diffusers.output_functions`)."""
        return self._output_function(prediction, target)

    @_exclusive
    def output(self, example: PreparedExample, position: int) -> torch.Tensor:
        """The scalar whose gradient DMin takes at the ``position``-th timestep: the config's output function of
        the denoiser's prediction for the example noised with the fixed noise, averaged over the noise draws."""
        inputs = self._inputs(example, position)
        return self._reduce(self._prediction(inputs.noisy, inputs.model_timestep, inputs.conditioning), inputs.target)

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
        return self.sketch_many([example])[0]

    @_exclusive
    def sketch_many(self, examples: list[PreparedExample], same_size_batches: bool = False) -> torch.Tensor:
        """The ``(N, T, K)`` DMin vectors of ``N`` examples, their ``N * T`` samples differentiated in batches
        that fit ``batch_bytes`` (one at a time where they do not, or where the model cannot be batched).

        Float results depend on the batch size (the kernels round differently), not on a sample's neighbours.
        ``same_size_batches=True`` pads a short last batch with repeats of its last sample, so an example's
        vector is bit-identical however examples are grouped (a resumed or multi-process cache)."""
        if not examples:
            return torch.zeros(0, len(self.config.timesteps), self.config.projection_dim)
        if self._batch_samples is None:
            self._batch_samples = self._measure_batch_samples(examples[0])
        if self._batch_samples > 1 and not self._per_layer_checked:
            self._check_per_layer(examples[0])
        if self._batch_samples <= 1:
            return torch.stack([self.sketch_sequential(example) for example in examples])
        positions = range(len(self.config.timesteps))
        samples = [(example, position) for example in examples for position in positions]
        try:
            rows = self._sketch_samples(samples, same_size_batches)
        except Exception as error:  # noqa: BLE001 - whatever a batched path refuses, the others compute the same
            self._fall_back(error)
            return self.sketch_many(examples, same_size_batches)
        return rows.reshape(len(examples), len(positions), -1)

    def _sketch_samples(self, samples: list[tuple[PreparedExample, int]], same_size_batches: bool) -> torch.Tensor:
        """``(len(samples), K)`` sketches, in batches of :attr:`batch_samples`."""
        rows = []
        for start in range(0, len(samples), self._batch_samples):
            batch = samples[start : start + self._batch_samples]
            padding = self._batch_samples - len(batch) if same_size_batches else 0
            batch = batch + batch[-1:] * padding
            sketches = self._sketch_per_layer(batch) if self._recorder else self._sketch_batch(batch)
            rows.append(sketches[: len(batch) - padding])
        return torch.cat(rows)

    def _fall_back(self, error: Exception) -> None:
        """Leaves the batched path that failed: per layer for ``vmap``, ``vmap`` for one at a time."""
        if self._recorder is not None:
            logger.warning("per-sample gradients could not be formed per layer (%s: %s); using torch.func.vmap",
                           type(error).__name__, error)
            self._recorder = None
            self._batch_samples = None
        else:
            logger.warning(
                "per-sample gradients could not be batched with torch.func.vmap (%s: %s); computing them one "
                "(example, timestep) at a time", type(error).__name__, error,
            )
            self._batch_samples = 1

    def _check_per_layer(self, example: PreparedExample) -> None:
        """Keeps the per-layer path only if it gives ``example`` the one-at-a-time path's vectors (a tracked
        layer used outside its own forward would not)."""
        self._per_layer_checked = True
        if self._recorder is None:
            return
        try:
            batched = self._sketch_samples([(example, p) for p in range(len(self.config.timesteps))], False)
        except Exception as error:  # noqa: BLE001 - reported, and vmap takes over
            self._fall_back(error)
        else:
            agreement = float(F.cosine_similarity(batched, self.sketch_sequential(example), dim=1).min())
            if agreement < PER_LAYER_AGREEMENT:
                self._fall_back(ValueError(f"its vectors have cosine {agreement:.6f} with the one-at-a-time path's"))
        if self._batch_samples is None:
            self._batch_samples = self._measure_batch_samples(example)

    def _measure_batch_samples(self, example: PreparedExample) -> int:
        """How many samples fit ``batch_bytes``: per sample, the bytes of every tensor autograd saves for backward
        in one forward (measured here, on ``example``) and, on the per-layer path, as many again for the output
        gradients and one parameter's per-sample gradient; with ``vmap``, the gradients of every parameter."""
        saved = 0

        def count(tensor: torch.Tensor) -> torch.Tensor:
            nonlocal saved
            saved += tensor.numel() * tensor.element_size()
            return tensor

        with self._tracking(streaming=False), torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
            self.output(example, 0)
        sizes = self.projector.parameter_sizes
        per_sample = 2 * saved + 4 * max(sizes) if self._recorder else saved + 4 * self.projector.total
        samples = max(1, min(MAX_BATCH_SAMPLES, self.batch_bytes // per_sample))
        timesteps = len(self.config.timesteps)
        return samples - samples % timesteps if samples >= timesteps else samples  # whole rows: no padding

    def _stacked_inputs(self, samples: list[tuple[PreparedExample, int]]) -> _DenoiserInputs:
        """The samples' inputs stacked along a new first axis: ``(samples, noise_draws, ...)``."""
        inputs = [self._inputs(example, position) for example, position in samples]
        return _DenoiserInputs(
            noisy=torch.stack([i.noisy for i in inputs]),
            model_timestep=torch.stack([i.model_timestep for i in inputs]),
            conditioning={key: torch.stack([i.conditioning[key] for i in inputs]) for key in inputs[0].conditioning},
            target=torch.stack([i.target for i in inputs]),
        )

    def _sketch_per_layer(self, samples: list[tuple[PreparedExample, int]]) -> torch.Tensor:
        """``(B, K)`` normalised sketches of ``B`` samples from one plain forward and backward of the whole batch,
        the per-sample gradients formed layer by layer."""
        stacked = self._stacked_inputs(samples)
        count, draws = stacked.noisy.shape[:2]
        flat = {key: value.flatten(0, 1) for key, value in stacked.conditioning.items()}
        with self._tracking(streaming=False), self._recorder.recording(count * draws):
            prediction = self._prediction(stacked.noisy.flatten(0, 1), stacked.model_timestep.flatten(0, 1), flat)
            total = self._reduce_samples(prediction.unflatten(0, (count, draws)), stacked.target).sum()
            return self._sketch_gradients(self._recorder.gradients(total, count), count, stacked.noisy.device)

    def _sketch_gradients(self, gradients, count: int, device: torch.device) -> torch.Tensor:
        """Normalised ``(count, K)`` sketches of per-sample gradients given one ``(count, ...)`` tensor per tracked
        parameter, in order."""
        accumulators = self.projector.new_accumulator(device, batch=count)
        squared_norms = torch.zeros(count, dtype=torch.float32, device=device)
        group: list[tuple[int, torch.Tensor]] = []  # small parameters go into the sketch together
        group_elements = 0
        for index, gradient in enumerate(gradients):
            norms = torch.linalg.vector_norm(gradient.reshape(count, -1), dim=1, dtype=torch.float32)
            squared_norms += norms.square()
            group.append((index, gradient))
            group_elements += gradient[0].numel()
            if group_elements >= SKETCH_GROUP_ELEMENTS:
                self.projector.accumulate_batch_group(accumulators, *map(list, zip(*group)))
                group, group_elements = [], 0
        if group:
            self.projector.accumulate_batch_group(accumulators, *map(list, zip(*group)))
        sketches = self.projector.finalize(accumulators)
        return (sketches / squared_norms.sqrt().clamp_min(1e-30)[:, None]).cpu()

    def _sketch_batch(self, samples: list[tuple[PreparedExample, int]]) -> torch.Tensor:
        """``(B, K)`` normalised sketches of ``B`` samples from one ``vmap(grad(...))`` call."""
        stacked = self._stacked_inputs(samples)
        tracked = {f"denoiser.{name}": p.detach() for name, p in self.parameters}

        def sample_output(params, noisy, model_timestep, conditioning, target):
            prediction = torch.func.functional_call(self._prediction, params, (noisy, model_timestep, conditioning))
            return self._reduce(prediction, target)

        with self._tracking(streaming=False), torch.no_grad(), warnings.catch_warnings():
            # vmap loops over the samples for ops without a batching rule (CPU fused attention) and says so
            warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet")
            gradients = torch.func.vmap(torch.func.grad(sample_output), in_dims=(None, 0, 0, 0, 0))(
                tracked, stacked.noisy, stacked.model_timestep, stacked.conditioning, stacked.target
            )
        ordered = (gradients.pop(f"denoiser.{name}") for name, _ in self.parameters)
        return self._sketch_gradients(ordered, len(samples), stacked.noisy.device)

    @_exclusive
    def sketch_sequential(self, example: PreparedExample) -> torch.Tensor:
        """:meth:`sketch` one timestep at a time: one backward per timestep, each parameter's gradient streamed
        into the sketch by a hook as autograd produces it (the path for models too large to batch)."""
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

    @_exclusive
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
