"""Output functions: the scalar of the denoiser's prediction whose gradient DMin takes (``DMinConfig.output_function``).

Each is registered under its name with :func:`register_output_function`; the name is then a valid
``DMinConfig.output_function`` (and ``dmin cache --output_function``), and the index card describes it. The
built-in ones are the DMin paper's training loss and two of D-TRAK's functions of the model output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

#: ``function(prediction, target) -> (samples,)``, see :func:`register_output_function`
OutputFunctionType = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class OutputFunction:
    """A registered output function: its ``name``, the ``function`` itself and the ``description`` the index card
    gives of it (``{objective}`` is replaced by the objective's name)."""

    name: str
    function: OutputFunctionType
    description: str


_REGISTRY: dict[str, OutputFunction] = {}


def register_output_function(name: str, description: str | None = None) -> Callable[[OutputFunctionType],
                                                                                      OutputFunctionType]:
    """Registers an output function under ``name`` (a decorator); a name already taken is refused (``ValueError``).

    The function receives, for a batch of samples (a training row or query at one timestep each):

    - ``prediction``: the denoiser's prediction, float32, ``(samples, noise_draws, *input_shape)``;
    - ``target``: what the training objective (``DMinConfig.objective``) trains the prediction towards for the
      same noisy input (the noise for epsilon, ``noise - x`` for flow matching, ...), of the same shape;

    and returns the ``(samples,)`` scalars whose gradients with respect to the tracked parameters are sketched: one
    per sample, averaged over its noise draws. Each sample's scalar may depend on that sample's values only (the
    batch is a computing convenience). ``description`` completes the card's sentence "The gradient of ... was
    taken"; ``{objective}`` in it is replaced by the objective's name.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"an output function needs a non-empty name, got {name!r}")

    def register(function: OutputFunctionType) -> OutputFunctionType:
        if not callable(function):
            raise TypeError(f"register_output_function({name!r}) expects a function, got {function!r}")
        if name in _REGISTRY:
            raise ValueError(f"an output function named {name!r} is already registered")
        text = description or f"the output function {name!r} of the model's prediction"
        _REGISTRY[name] = OutputFunction(name, function, text)
        return function

    return register


def output_function_named(name: str) -> OutputFunction:
    """The output function registered as ``name`` (``ValueError`` naming the registered ones otherwise)."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"output_function must be one of {OUTPUT_FUNCTIONS}, got {name!r}") from None


class _RegisteredNames(Sequence):
    """The registered names, in registration order, read live from the registry (so validation and the CLI's
    choices see functions registered after import)."""

    def __getitem__(self, position):
        return tuple(_REGISTRY)[position]

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(_REGISTRY))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in _REGISTRY

    def __eq__(self, other: object) -> bool:
        return tuple(self) == (tuple(other) if isinstance(other, Sequence) else other)

    def __repr__(self) -> str:
        return repr(tuple(_REGISTRY))


#: the names of the registered output functions (a live view of the registry)
OUTPUT_FUNCTIONS: Sequence[str] = _RegisteredNames()


@register_output_function(
    "loss",
    "the training loss ({objective}: the model's prediction against the target of the fixed noise), as in the DMin "
    "paper",
)
def training_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The mean squared error against the objective's target (the paper's output function)."""
    return (prediction - target).square().flatten(1).mean(dim=1)


@register_output_function(
    "squared_norm",
    "the squared L2 norm of the model's output (D-TRAK's output function; it does not use the training target)",
)
def squared_norm(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The squared L2 norm of the prediction, averaged over the noise draws (D-TRAK)."""
    return prediction.square().flatten(1).sum(dim=1) / prediction.shape[1]


@register_output_function("mean", "the mean of the model's output (it does not use the training target)")
def output_mean(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The mean of the prediction."""
    return prediction.flatten(1).mean(dim=1)
