"""`InfluenceMixin`: `build_attribution_index`, `load_attribution_index` and `attribute` on diffusers pipelines."""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline

from .caching import DEFAULT_IMAGE_COLUMN, cache_dataset
from .config import CONFIG_NAME, DMinConfig, check_integer
from .families import PipelineFamily, detect_family
from .gradients import DEFAULT_BATCH_BYTES, GradientSketcher, check_config_matches
from .hub import resolve_index_location
from .index import AttributionIndex
from .inputs import ImageInput, to_pil
from .result import AttributionResult


#: rows returned by ``attribute`` (and ``dmin attribute``) unless told otherwise
DEFAULT_TOP_K = 10


class InfluenceMixin:
    """Adds DMin training-data attribution to a diffusers pipeline of any registered family (DDPM, Stable
    Diffusion 1.x/2.x, SDXL, SD3, Flux, and those added with :func:`~dmin_diffusers.register_family`).

    Index state lives in private attributes, so the pipeline's components, config and ``save_pretrained``
    output are those of the plain diffusers class.
    """

    _attribution_index: AttributionIndex | None = None
    _attribution_sketcher: GradientSketcher | None = None

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
        index = getattr(pipeline, "_attribution_index", None)
        if index is not None:
            new.load_attribution_index(index)
        return new

    @property
    def attribution_index(self) -> AttributionIndex | None:
        """The attached :class:`AttributionIndex`, if any."""
        return self._attribution_index

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

        def check(source: str, config: DMinConfig) -> None:
            differences = check_config_matches(config, family)
            if not differences:
                return
            message = (
                f"the attribution index {source} does not belong to this {type(self).__name__}: "
                + "; ".join(differences)
            )
            if strict:
                raise ValueError(message + " (pass strict=False to use it anyway)")
            warnings.warn(message, stacklevel=3)

        index = pretrained_index_name_or_path
        if isinstance(index, AttributionIndex):
            check(index.source, index.config)
        else:
            location = resolve_index_location(
                index, revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only,
                repo_type=kwargs.get("repo_type", "dataset"), subfolder=kwargs.get("subfolder"), metadata_only=True,
            )
            if location.from_hub:  # refuse a Hub index from its config, before downloading its vectors
                check(location.source, DMinConfig.from_json_file(location.directory / CONFIG_NAME))
                revision = location.commit or revision
            index = AttributionIndex.from_pretrained(
                index, revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only, **kwargs
            )
            if not location.from_hub:
                check(index.source, index.config)
        if dataset is not None:
            index.attach_dataset(dataset, strict=strict)
        self._attribution_index = index
        self._attribution_sketcher = GradientSketcher(family, index.config)
        return index

    def unload_attribution_index(self) -> None:
        """Detaches the attribution index (and the state computed for it), as ``unload_lora_weights`` does for
        LoRA weights; ``attribute`` then needs ``load_attribution_index`` again."""
        self._attribution_index = None
        self._attribution_sketcher = None

    def attribution_vector(self, image: ImageInput, prompt: str | None = None) -> torch.Tensor:
        """The ``(T, K)`` DMin vector of one image (and prompt), computed exactly as for training rows."""
        sketcher = self._require_sketcher()
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
        index, sketcher = self._require_index(), self._require_sketcher()
        images, prompts, is_batch = _as_batch(image, prompt)
        for each in prompts:
            _check_prompt(sketcher.family, each)
        vectors = sketcher.sketch_many([sketcher.prepare(img, text) for img, text in zip(images, prompts)])
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

    def _require_index(self) -> AttributionIndex:
        if self._attribution_index is None:
            raise ValueError(
                "no attribution index is attached: call build_attribution_index(...) or load_attribution_index(...)"
            )
        return self._attribution_index

    def _require_sketcher(self) -> GradientSketcher:
        self._require_index()
        return self._attribution_sketcher


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
