"""The family registry: which :class:`~dmin_diffusers.families.PipelineFamily` serves a pipeline.

A pipeline's family is found by walking its class's MRO against the registered pipeline classes, so subclasses
(the ``DMin...Pipeline`` classes, your own) are served by their parent's family. The families shipped with
dmin-diffusers are the other modules of this package, each registering itself when imported; their ready-made
pipeline classes register themselves with :func:`register_ready_made` from :mod:`dmin_diffusers.pipelines`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

from .base import PipelineFamily

_BY_PIPELINE_CLASS: dict[type, type[PipelineFamily]] = {}
_BY_NAME: dict[str, type[PipelineFamily]] = {}
_INFRASTRUCTURE = {"base", "registry"}
_builtins_loaded = False


def register_family(family: type[PipelineFamily]) -> type[PipelineFamily]:
    """Registers a :class:`PipelineFamily` subclass for the pipeline classes it lists (usable as a decorator).

    Its ``name`` is recorded in the configs of the indices it builds, so it must be unique; a pipeline class
    already served by another family is refused (``ValueError``).
    """
    if not (isinstance(family, type) and issubclass(family, PipelineFamily)):
        raise TypeError(f"register_family expects a PipelineFamily subclass, got {family!r}")
    if not family.name or not family.pipeline_classes:
        raise ValueError(f"{family.__name__} must set `name` and `pipeline_classes`")
    _load_builtins()
    if _BY_NAME.get(family.name, family) is not family:
        raise ValueError(f"a family named {family.name!r} is already registered ({_BY_NAME[family.name].__name__})")
    taken = [cls.__name__ for cls in family.pipeline_classes if _BY_PIPELINE_CLASS.get(cls, family) is not family]
    if taken:
        raise ValueError(f"{', '.join(taken)} already belong to another family")
    _BY_NAME[family.name] = family
    _BY_PIPELINE_CLASS.update(dict.fromkeys(family.pipeline_classes, family))
    return family


def register_ready_made(family_name: str) -> Callable[[type], type]:
    """Records the decorated pipeline class as the ready-made ``DMin...Pipeline`` of the family called
    ``family_name`` (its :attr:`~dmin_diffusers.families.PipelineFamily.ready_made`, which ``enable_attribution``
    and the index card use). The class must derive from one of the family's pipeline classes; a family has at most
    one ready-made class (``ValueError``). The shipped families' classes are registered in
    :mod:`dmin_diffusers.pipelines`, above the families, which never import the mixin."""

    def register(pipeline_class: type) -> type:
        family = family_named(family_name)
        if family is None:
            raise ValueError(f"no family named {family_name!r} is registered")
        if not (isinstance(pipeline_class, type) and issubclass(pipeline_class, family.pipeline_classes)):
            raise TypeError(f"{pipeline_class!r} does not derive from a pipeline class of the {family_name!r} family")
        if family.ready_made not in (None, pipeline_class):
            raise ValueError(
                f"the {family_name!r} family already has a ready-made class ({family.ready_made.__name__})"
            )
        family.ready_made = pipeline_class
        return pipeline_class

    return register


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    package = importlib.import_module(__package__)
    for module in pkgutil.iter_modules(package.__path__):
        if module.name not in _INFRASTRUCTURE:
            importlib.import_module(f"{__package__}.{module.name}")


def registered_families() -> list[type[PipelineFamily]]:
    """Every registered family, the shipped ones first."""
    _load_builtins()
    return list(_BY_NAME.values())


def family_named(name: str) -> type[PipelineFamily] | None:
    """The registered family called ``name`` (as recorded in an index config), if any."""
    _load_builtins()
    return _BY_NAME.get(name)


def detect_family(pipeline: Any) -> PipelineFamily:
    """The family serving ``pipeline``, from its class's MRO; ``TypeError`` for anything else."""
    _load_builtins()
    if getattr(pipeline, "components", None) is None:
        raise TypeError(f"expected a diffusers pipeline, got {type(pipeline).__name__}")
    for cls in type(pipeline).__mro__:
        if cls in _BY_PIPELINE_CLASS:
            return _BY_PIPELINE_CLASS[cls](pipeline)
    supported = ", ".join(cls.__name__ for cls in _BY_PIPELINE_CLASS)
    raise TypeError(
        f"{type(pipeline).__name__} is not supported by dmin-diffusers (supported: {supported}); a pipeline we do "
        "not ship can be added with dmin_diffusers.register_family (see the README, 'Supporting another pipeline')"
    )
