"""The ways stored rows and queries can be compared (``DMinConfig.preconditioning``), registered by name.

A preconditioning is a combination of three steps that :class:`~dmin_diffusers.preconditioner.Preconditioner`
fits per timestep from the stored rows and applies alike to exact search, HNSW and ``timestep_scores``: removing
the rows' mean, TRAK's kernel ``(C + λI)^-1/2`` (``C`` the rows' second-moment matrix, or their covariance once
centred) and dividing each row by its norm in the resulting geometry (a cosine). :func:`register_preconditioning`
adds a combination under a new name; the name is then a valid ``DMinConfig.preconditioning`` and ``dmin cache
--preconditioning``, and the index card describes it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preconditioning:
    """A registered preconditioning: its ``name``, its steps, and the ``description`` that completes the card's
    sentence "a row's influence on [a query] is ..." (``{damping}`` is replaced by the damping)."""

    name: str
    centred: bool
    kernel: bool
    normalise_rows: bool
    description: str

    @property
    def is_identity(self) -> bool:
        """Whether rows are compared by their plain inner product (nothing to fit or store)."""
        return not (self.centred or self.kernel or self.normalise_rows)


_REGISTRY: dict[str, Preconditioning] = {}


def register_preconditioning(name: str, *, centred: bool = False, kernel: bool = False, normalise_rows: bool = False,
                             description: str) -> Preconditioning:
    """Registers the preconditioning ``name`` (``ValueError`` if the name is taken or empty) and returns it."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a preconditioning needs a non-empty name, got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"a preconditioning named {name!r} is already registered")
    _REGISTRY[name] = Preconditioning(name, bool(centred), bool(kernel), bool(normalise_rows), description)
    return _REGISTRY[name]


def registered_preconditionings() -> tuple[str, ...]:
    """The registered names, in registration order."""
    return tuple(_REGISTRY)


def preconditioning_named(name: str) -> Preconditioning:
    """The preconditioning registered as ``name`` (``ValueError`` naming the registered ones otherwise)."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"preconditioning must be one of {registered_preconditionings()}, got {name!r}") from None


register_preconditioning("none", description="the inner product of their rows")
register_preconditioning("centered", centred=True, normalise_rows=True,
                         description="the sum over timesteps of the cosine of their rows after removing the rows' mean")
register_preconditioning(
    "kernel", kernel=True,
    description="the sum over timesteps of TRAK's kernel product q^T (C + λI)^-1 g, C the stored rows' second-moment "
    "matrix and λ = {damping:g} x its largest eigenvalue, with the query normalised in that geometry")
register_preconditioning(
    "centered-kernel", centred=True, kernel=True,
    description="the sum over timesteps of TRAK's kernel product (q - μ)^T (C + λI)^-1 (g - μ), μ the stored rows' "
    "mean, C their covariance and λ = {damping:g} x its largest eigenvalue, with the query normalised in that "
    "geometry")
