"""`InfluenceMixin`: `build_attribution_index`, `load_attribution_index` and `attribute` on diffusers pipelines."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline

from .caching import DEFAULT_IMAGE_COLUMN, cache_dataset
from .config import CONFIG_NAME, DMinConfig, check_integer
from .families import PipelineFamily, detect_family
from .gradients import DEFAULT_BATCH_BYTES, GradientSketcher
from .hub import DEFAULT_REPO_TYPE, resolve_index_location
from .search import DEFAULT_TOP_K
from .index import AttributionIndex
from .inputs import ImageInput, to_pil
from .model_state import ModelMismatchError, model_lock, pipeline_state
from .resolution import check_config_matches, select_tracked_parameters
from .result import AttributionResult


#: rows returned by ``attribute`` (and ``dmin attribute``) unless told otherwise


@dataclass(frozen=True)
class _Attached:
    """An attached index with what was computed for it (replaced whole, so a concurrent reader sees one or the
    other): the sketcher, the :func:`~dmin_diffusers.model_state.pipeline_state` it was last checked at, and
    whether a mismatch is an error (``strict``) or a warning."""

    index: AttributionIndex
    sketcher: GradientSketcher
    state: str
    strict: bool


class InfluenceMixin:
    """Adds DMin training-data attribution to a diffusers pipeline of any registered family (DDPM, Stable
    Diffusion 1.x/2.x, SDXL, SD3, Flux, and those added with :func:`~dmin_diffusers.register_family`).

    Index state lives in private attributes, so the pipeline's components, config and ``save_pretrained``
    output are those of the plain diffusers class.

    Thread safety: ``attribute``, ``attribution_vector`` and generation (``pipe(...)``) hold a lock of the
    pipeline's denoiser (:func:`~dmin_diffusers.model_state.model_lock`), so calls from several threads (the
    page's concurrent users) run one at a time and give the answers they would give alone.

    The model is checked at every query, not only when the index is attached: a query after
    ``load_lora_weights``, ``set_adapters``, ``fuse_lora``, ``disable_lora``, an edit of the weights or a replaced
    component raises :class:`~dmin_diffusers.model_state.ModelMismatchError` unless the model still matches the
    index (with ``strict=False`` at load, it warns instead).
    """

    _attached: _Attached | None = None

    def __call__(self, *args: Any, **kwargs: Any):
        # generation uses the denoiser whose parameters attribution swaps: never both at once
        with self._model_lock():
            return super().__call__(*args, **kwargs)

    def _model_lock(self):
        return model_lock(detect_family(self).denoiser)

    def to_json_string(self) -> str:
        # Save under the plain diffusers class name so that the saved pipeline loads without this package.
        config = json.loads(super().to_json_string())
        config["_class_name"] = _diffusers_base(type(self)).__name__
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, **kwargs: Any):
        """diffusers' ``from_pipe`` (a new pipeline on the same components); an attribution index attached to
        ``pipeline`` is attached to the new one too, after the usual check that it belongs to it."""
        new = super().from_pipe(pipeline, **kwargs)
        attached = getattr(pipeline, "_attached", None)
        if attached is not None:
            new.load_attribution_index(attached.index, strict=attached.strict)
        return new

    @property
    def attribution_index(self) -> AttributionIndex | None:
        """The attached :class:`AttributionIndex`, if any."""
        attached = self._attached
        return attached.index if attached is not None else None

    def build_attribution_index(
        self,
        dataset: Any,
        output_dir: str | os.PathLike,
        config: DMinConfig | None = None,
        image_column: str = DEFAULT_IMAGE_COLUMN,
        caption_column: str | None = None,
        dataset_reference: dict[str, Any] | None = None,
        progress: bool = True,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
    ) -> AttributionIndex:
        """Caches the compressed gradients of every row of ``dataset`` in ``output_dir``, builds the HNSW
        index and attaches the result to this pipeline.

        A run interrupted part-way can be resumed by calling again with the same arguments: finished rows are
        kept and skipped. A directory holding anything else, or an index with other settings, is refused.

        Args:
            dataset: a ``datasets.Dataset`` (rows are identified by their position in it).
            output_dir: directory for the index files.
            config: DMin settings; :class:`DMinConfig`'s defaults when omitted.
            image_column: column with the training images.
            caption_column: column with the prompts (text-to-image pipelines only; default ``"text"``).
            dataset_reference: where the dataset comes from (``name``, ``config_name``, ``revision``, ``split``),
                recorded so that results can load the rows without the dataset object.
            progress: show a tqdm progress bar.
            batch_bytes: memory budget of one batched backward over several (row, timestep) samples (their
                per-sample gradients and activations); ``0`` computes them one at a time.

        For several processes, or to cache from a training loop, see :func:`dmin_diffusers.caching.cache_dataset`.
        """
        index = cache_dataset(
            self, dataset, output_dir, config, image_column, caption_column, dataset_reference=dataset_reference,
            progress=progress, batch_bytes=batch_bytes,
        )
        self.load_attribution_index(index)
        return index

    def load_attribution_index(
        self,
        pretrained_index_name_or_path: str | os.PathLike | AttributionIndex,
        dataset: Any = None,
        strict: bool = True,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        **kwargs: Any,
    ) -> AttributionIndex:
        """Attaches a saved index to this pipeline, from a directory or a Hub repository (replacing any index
        attached before).

        Args:
            pretrained_index_name_or_path: a directory written by ``build_attribution_index`` /
                ``save_pretrained``, a Hub repository id written by ``AttributionIndex.push_to_hub``, or an
                :class:`AttributionIndex`.
            dataset: the training ``datasets.Dataset``, so that results can return the rows themselves (by
                default they are loaded from the Hub dataset the index records, when there is one).
            strict: refuse (``ValueError``) an index whose config, tracked parameters (names, shapes, values),
                denoiser, input models (VAE, text encoders, tokenizers) or objective do not match this pipeline, or
                a ``dataset`` whose sampled rows differ from those the index was built on; with ``False`` only warn.
            revision, token, cache_dir, local_files_only: as in ``AttributionIndex.from_pretrained``; further
                keyword arguments (``repo_type``, ``subfolder``, ``force_download``, ``verify``) go there too.

        A Hub index is checked against the pipeline from its config alone, before its vectors are downloaded.
        """
        family = detect_family(self)
        index = pretrained_index_name_or_path
        if isinstance(index, AttributionIndex):
            self._check_belongs(family, index.source, index.config, strict)
        else:
            index = self._open_index(index, family, strict, revision=revision, token=token, cache_dir=cache_dir,
                                     local_files_only=local_files_only, **kwargs)
        if dataset is not None:
            index.attach_dataset(dataset, strict=strict)
        with model_lock(family.denoiser):
            sketcher = GradientSketcher(family, index.config)
            self._attached = _Attached(index, sketcher, _state_of(sketcher), bool(strict))
        return index

    def _open_index(self, name_or_path: str | os.PathLike, family: PipelineFamily, strict: bool, *,
                    revision: str | None, **kwargs: Any) -> AttributionIndex:
        """Opens an index from a directory or the Hub (``kwargs`` as in ``AttributionIndex.from_pretrained``) and
        checks that it belongs to this pipeline: a Hub index from its config alone, before its vectors are
        downloaded (then from the commit that config was read from)."""
        location = resolve_index_location(
            name_or_path, revision=revision, token=kwargs.get("token"), cache_dir=kwargs.get("cache_dir"),
            local_files_only=kwargs.get("local_files_only", False), repo_type=kwargs.get("repo_type", DEFAULT_REPO_TYPE),
            subfolder=kwargs.get("subfolder"), metadata_only=True,
        )
        if not location.from_hub:
            index = AttributionIndex.from_pretrained(name_or_path, revision=revision, **kwargs)
            self._check_belongs(family, index.source, index.config, strict, stacklevel=4)
            return index
        self._check_belongs(family, location.source, DMinConfig.from_json_file(location.directory / CONFIG_NAME),
                            strict, stacklevel=4)
        return AttributionIndex.from_pretrained(name_or_path, revision=location.commit or revision, **kwargs)

    def _check_belongs(self, family: PipelineFamily, source: str, config: DMinConfig, strict: bool,
                       stacklevel: int = 3) -> None:
        """Refuses (:class:`~dmin_diffusers.model_state.ModelMismatchError`) or, unless ``strict``, warns about
        an index whose config does not match this pipeline. ``stacklevel`` points the warning at the caller of
        ``load_attribution_index``."""
        differences = check_config_matches(config, family)
        if not differences:
            return
        message = f"the attribution index {source} does not belong to this {type(self).__name__}: " + "; ".join(
            differences)
        if strict:
            raise ModelMismatchError(message + " (pass strict=False to use it anyway)")
        warnings.warn(message, stacklevel=stacklevel)

    def unload_attribution_index(self) -> None:
        """Detaches the attribution index (and the state computed for it), as ``unload_lora_weights`` does for
        LoRA weights; ``attribute`` then needs ``load_attribution_index`` again."""
        self._attached = None

    def attribution_vector(self, image: ImageInput, prompt: str | None = None) -> torch.Tensor:
        """The ``(T, K)`` DMin vector of one image (and prompt), computed exactly as for training rows."""
        with self._model_lock():
            sketcher = self._checked().sketcher
            _check_prompt(sketcher.family, prompt)
            return sketcher.sketch(sketcher.prepare(image, prompt))

    def attribute(
        self,
        image: ImageInput | list[ImageInput],
        prompt: str | list[str] | None = None,
        top_k: int = DEFAULT_TOP_K,
        exact: bool = False,
    ) -> AttributionResult | list[AttributionResult]:
        """The ``top_k`` training rows with the largest DMin influence on ``image``.

        Args:
            image: the generated image: PIL, numpy or torch, as diffusers pipelines return it. A batch (a list of
                images, or a 4-D array or tensor as ``output_type="np"`` / ``"pt"`` gives) returns one result per
                image, their gradients computed in batched backward passes.
            prompt: the prompt the image was generated from (omit for unconditional pipelines); for a batch,
                one prompt for every image or a list with one per image.
            top_k: how many rows to return (all rows if the index has fewer): an integer of at least 1 (a Python or
                numpy integer, not a bool or a float).
            exact: score every row; by default HNSW proposes the candidates.

        Returns:
            an :class:`AttributionResult`, or a list of them for a batch.
        """
        top_k = check_integer("top_k", top_k, 1)
        if not isinstance(exact, (bool, np.bool_)):
            raise TypeError(f"exact must be True or False, got {type(exact).__name__} {exact!r}")
        with self._model_lock():
            return self._attribute(image, prompt, top_k, bool(exact))

    def _attribute(self, image: Any, prompt: Any, top_k: int, exact: bool):
        attached = self._checked()
        index, sketcher = attached.index, attached.sketcher
        images, prompts, is_batch = _as_batch(image, prompt)
        for each in prompts:
            _check_prompt(sketcher.family, each)
        vectors = sketcher.sketch_many([sketcher.prepare(img, text) for img, text in zip(images, prompts)])
        _refuse_zero_timesteps(vectors, index.config.timesteps)
        results = []
        for img, text, vector in zip(images, prompts, vectors):
            indices, scores = index.search(vector, top_k, exact=bool(exact))
            results.append(AttributionResult(
                indices=indices, scores=scores, image=to_pil(img), prompt=text, exact=bool(exact),
                dataset=index.dataset, image_column=index.dataset_info.get("image_column"),
                caption_column=index.dataset_info.get("caption_column"),
                timestep_scores=index.timestep_scores(vector, indices),
            ))
        return results if is_batch else results[0]

    def _require_attached(self) -> _Attached:
        attached = self._attached
        if attached is None:
            raise ValueError(
                "no attribution index is attached: call build_attribution_index(...) or load_attribution_index(...)"
            )
        return attached

    def _require_sketcher(self) -> GradientSketcher:
        return self._require_attached().sketcher

    def _checked(self) -> _Attached:
        """The attached index and its sketcher, after checking (cheaply, see
        :func:`~dmin_diffusers.model_state.pipeline_state`) that the pipeline is still the model it was built on.
        When the model changed, the full check of ``load_attribution_index`` runs again: a mismatch raises
        :class:`~dmin_diffusers.model_state.ModelMismatchError` (warns, with ``strict=False``); a match (e.g. the
        same LoRA loaded again) re-binds the sketcher to the current parameters. Call with the model lock held."""
        attached = self._require_attached()
        sketcher = attached.sketcher
        try:
            state = _state_of(sketcher)
        except ValueError as error:  # e.g. the tracked parameters are gone
            state, problem = None, [str(error)]
        else:
            if state == attached.state:
                return attached
            problem = check_config_matches(attached.index.config, sketcher.family)
        if problem:
            message = (
                f"this {type(self).__name__} changed since the attribution index {attached.index.source} was "
                f"attached and no longer matches it: {'; '.join(problem)}"
            )
            if attached.strict:
                raise ModelMismatchError(
                    message + ". Attribute with the model the index was built on (e.g. load its LoRA again with "
                    "the same scale), or build an index for this one"
                )
            warnings.warn(message, stacklevel=4)
        sketcher = GradientSketcher(sketcher.family, attached.index.config, projector=sketcher.projector)
        attached = replace(attached, sketcher=sketcher, state=state or _state_of(sketcher))
        self._attached = attached
        return attached


def _state_of(sketcher: GradientSketcher) -> str:
    """The :func:`~dmin_diffusers.model_state.pipeline_state` of the sketcher's pipeline, with the parameters its
    config tracks selected anew (so a loaded adapter or a replaced denoiser shows)."""
    family = sketcher.family
    denoiser = family.denoiser
    return pipeline_state(family.pipeline, denoiser,
                          select_tracked_parameters(denoiser, sketcher.config.tracked_parameters), family.input_models)


def _refuse_zero_timesteps(vectors: torch.Tensor, timesteps: list[int]) -> None:
    """Refuses ``(N, T, K)`` query vectors with a timestep of all zeros (a gradient of zero: no ranking exists)."""
    empty = vectors.abs().amax(dim=-1) == 0
    if bool(empty.any()):
        image, position = (int(i) for i in empty.nonzero()[0])
        raise ValueError(
            f"the DMin vector of query {image} is zero at timestep {timesteps[position]}: the tracked parameters do "
            "not affect the model's output (a LoRA scale of 0, or disabled adapters?); no ranking can be computed"
        )


def _as_batch(image: Any, prompt: Any) -> tuple[list[Any], list[Any], bool]:
    """``(images, prompts, is_batch)``: a list, tuple, or 4-D array / tensor of images is a batch."""
    if isinstance(image, (list, tuple)):
        images = list(image)
    elif isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 4:
        images = list(image)
    else:
        if isinstance(prompt, (list, tuple)):
            raise TypeError("one image takes one prompt (a string); pass a list of images for a list of prompts")
        return [image], [prompt], False
    if not images:
        raise ValueError("the batch of images is empty")
    if isinstance(prompt, (list, tuple)):
        if len(prompt) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompt)} prompts: give one prompt per image, or one")
        return images, list(prompt), True
    return images, [prompt] * len(images), True


def _check_prompt(family: PipelineFamily, prompt: Any) -> None:
    if not family.takes_prompt:
        if prompt is not None:
            raise ValueError(f"{family.name} pipelines are unconditional: call attribute(image) without a prompt")
        return
    if prompt is None:
        raise ValueError(f"{family.name} pipelines are text-to-image: attribute(image, prompt) needs the prompt")
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")


def _diffusers_base(cls: type) -> type:
    """The first class in the MRO that does not derive from `InfluenceMixin` (the diffusers pipeline)."""
    return next(base for base in cls.__mro__ if not issubclass(base, InfluenceMixin))


_DYNAMIC: dict[type, type] = {}


def enable_attribution(pipeline: DiffusionPipeline) -> DiffusionPipeline:
    """Gives an existing pipeline instance the `InfluenceMixin` methods, in place, and returns it: it becomes
    its family's ready-made ``DMin...Pipeline`` when it is an instance of exactly that pipeline class, else a
    ``DMin<its class>`` subclass made on the fly.

    Its components are untouched, and ``save_pretrained`` still writes the original class name.
    """
    if isinstance(pipeline, InfluenceMixin):
        return pipeline
    if not isinstance(pipeline, DiffusionPipeline):
        raise TypeError(f"expected a diffusers pipeline, got {type(pipeline).__name__}")
    family = detect_family(pipeline)  # fail early for unsupported pipelines
    cls = type(pipeline)
    if family.ready_made is not None and _diffusers_base(family.ready_made) is cls:
        pipeline.__class__ = family.ready_made
        return pipeline
    if cls not in _DYNAMIC:
        _DYNAMIC[cls] = type(f"DMin{cls.__name__}", (InfluenceMixin, cls), {"__module__": __name__})
    pipeline.__class__ = _DYNAMIC[cls]
    return pipeline
