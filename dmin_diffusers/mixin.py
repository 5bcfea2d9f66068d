"""`InfluenceMixin`: `build_attribution_index`, `load_attribution_index` and `attribute` on diffusers pipelines."""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import numpy as np
import torch
from diffusers import DDPMPipeline, DiffusionPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline
from .caching import cache_dataset
from .config import CONFIG_NAME, DMinConfig, check_integer
from .families import PipelineFamily, detect_family
from .gradients import DEFAULT_BATCH_BYTES, GradientSketcher, check_config_matches
from .hub import resolve_index_location
from .index import AttributionIndex
from .inputs import ImageInput, to_pil
from .result import AttributionResult


class InfluenceMixin:
    """Adds DMin training-data attribution to a diffusers pipeline (DDPM, Stable Diffusion, SD3).

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

    @property
    def attribution_index(self) -> AttributionIndex | None:
        """The attached :class:`AttributionIndex`, if any."""
        return self._attribution_index

    def build_attribution_index(
        self,
        dataset: Any,
        output_dir: str | os.PathLike,
        config: DMinConfig | None = None,
        image_column: str = "image",
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
            config: DMin settings; the paper's defaults when omitted.
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
        index: str | os.PathLike | AttributionIndex,
        dataset: Any = None,
        strict: bool = True,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        **kwargs: Any,
    ) -> AttributionIndex:
        """Attaches a saved index to this pipeline, from a directory or a Hub repository.

        Args:
            index: a directory written by ``build_attribution_index`` / ``save_pretrained``, a Hub repository id
                written by ``AttributionIndex.push_to_hub``, or an index.
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

    def attribution_vector(self, image: ImageInput, prompt: str | None = None) -> torch.Tensor:
        """The ``(T, K)`` DMin vector of one image (and prompt), computed exactly as for training rows."""
        sketcher = self._require_sketcher()
        _check_prompt(sketcher.family, prompt)
        return sketcher.sketch(sketcher.prepare(image, prompt))

    def attribute(
        self, image: ImageInput, prompt: str | None = None, top_k: int = 10, exact: bool = False
    ) -> AttributionResult:
        """The ``top_k`` training rows with the largest DMin influence on ``image``.

        Args:
            image: the generated image: PIL, numpy or torch, as diffusers pipelines return it.
            prompt: the prompt it was generated from (omit for unconditional pipelines).
            top_k: how many rows to return (all rows if the index has fewer): an integer of at least 1 (a Python or
                numpy integer, not a bool or a float).
            exact: score every row; by default HNSW proposes the candidates.
        """
        top_k = check_integer("top_k", top_k, 1)
        if not isinstance(exact, (bool, np.bool_)):
            raise TypeError(f"exact must be True or False, got {type(exact).__name__} {exact!r}")
        index = self._require_index()
        vector = self.attribution_vector(image, prompt)
        indices, scores = index.search(vector, top_k, exact=bool(exact))
        return AttributionResult(
            indices=indices,
            scores=scores,
            image=to_pil(image),
            prompt=prompt,
            exact=bool(exact),
            dataset=index.dataset,
            image_column=index.dataset_info.get("image_column"),
            caption_column=index.dataset_info.get("caption_column"),
        )

    def _require_index(self) -> AttributionIndex:
        if self._attribution_index is None:
            raise ValueError(
                "no attribution index is attached: call build_attribution_index(...) or load_attribution_index(...)"
            )
        return self._attribution_index

    def _require_sketcher(self) -> GradientSketcher:
        self._require_index()
        return self._attribution_sketcher


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


class DMinDDPMPipeline(InfluenceMixin, DDPMPipeline):
    """`DDPMPipeline` with DMin attribution: ``pipe.attribute(image, top_k=10)``."""


class DMinStableDiffusionPipeline(InfluenceMixin, StableDiffusionPipeline):
    """`StableDiffusionPipeline` with DMin attribution: ``pipe.attribute(image, prompt, top_k=10)``."""


class DMinStableDiffusion3Pipeline(InfluenceMixin, StableDiffusion3Pipeline):
    """`StableDiffusion3Pipeline` with DMin attribution: ``pipe.attribute(image, prompt, top_k=10)``."""


_READY_MADE = {
    DDPMPipeline: DMinDDPMPipeline,
    StableDiffusionPipeline: DMinStableDiffusionPipeline,
    StableDiffusion3Pipeline: DMinStableDiffusion3Pipeline,
}
_DYNAMIC: dict[type, type] = {}


def enable_attribution(pipeline: DiffusionPipeline) -> DiffusionPipeline:
    """Gives an existing pipeline instance the `InfluenceMixin` methods, in place, and returns it.

    Its components are untouched, and ``save_pretrained`` still writes the original class name.
    """
    if isinstance(pipeline, InfluenceMixin):
        return pipeline
    if not isinstance(pipeline, DiffusionPipeline):
        raise TypeError(f"expected a diffusers pipeline, got {type(pipeline).__name__}")
    detect_family(pipeline)  # fail early for unsupported pipelines
    cls = type(pipeline)
    if cls not in _READY_MADE and cls not in _DYNAMIC:
        _DYNAMIC[cls] = type(f"DMin{cls.__name__}", (InfluenceMixin, cls), {"__module__": __name__})
    pipeline.__class__ = _READY_MADE.get(cls) or _DYNAMIC[cls]
    return pipeline
