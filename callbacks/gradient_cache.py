"""`GradientCacheCallback`: after training, cache the training set's DMin vectors with the trained pipeline."""

from __future__ import annotations

import logging
import os
from argparse import Namespace
from typing import Any

from dmin_diffusers.caching import DEFAULT_CAPTION_COLUMN, DEFAULT_IMAGE_COLUMN, cache_dataset
from dmin_diffusers.gradients import DEFAULT_BATCH_BYTES
from dmin_diffusers.config import DMinConfig, require_config
from dmin_diffusers.index import AttributionIndex
from dmin_diffusers.mixin import enable_attribution
from dmin_diffusers.setting_arguments import chosen_settings
from dmin_diffusers.training_data import INDEX_SUBFOLDER, dataset_reference, load_training_dataset

logger = logging.getLogger(__name__)

class GradientCacheCallback:
    """Caches compressed per-sample loss gradients of the training set once training has finished.

    Args:
        output_dir: where the attribution index is written.
        config: DMin settings (:class:`DMinConfig`'s defaults when omitted).
        image_column, caption_column: dataset columns (the caption is ignored for unconditional models).
        dataset_args: the training script's dataset arguments (``dataset_name``, ``train_data_dir``,
            ``max_train_samples``, ``seed``, ...), used to load the rows when ``on_train_end`` gets no dataset.
        batch_bytes: memory budget of one batched backward while caching (see
            :func:`~dmin_diffusers.caching.cache_dataset`).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        config: DMinConfig | None = None,
        image_column: str = DEFAULT_IMAGE_COLUMN,
        caption_column: str | None = DEFAULT_CAPTION_COLUMN,
        dataset_args: dict[str, Any] | None = None,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
    ):
        self.output_dir = output_dir
        self.batch_bytes = batch_bytes
        self.config = require_config(config)
        self.image_column, self.caption_column = image_column, caption_column
        self.dataset_args = dataset_args or {}

    @classmethod
    def from_training_args(cls, args: Namespace, **overrides: Any) -> "GradientCacheCallback":
        """Reads a diffusers training script's argparse namespace.

        Uses ``resolution``, ``image_interpolation_mode`` (the text-to-image scripts' resize filter, default
        ``"lanczos"`` there; scripts without it, ``train_dreambooth.py`` and the SD3 / Flux DreamBooth scripts,
        resize bilinearly, :class:`DMinConfig`'s default),
        ``image_column``, ``caption_column``, ``max_sequence_length`` and ``guidance_scale`` (SD3 and Flux scripts),
        the dataset arguments and ``seed``; the index goes to ``<output_dir>/dmin-index``. Optional ``dmin_<field>``
        attributes for the other :class:`DMinConfig` settings (``dmin_num_timesteps``, ``dmin_output_function``,
        ...: :func:`~dmin_diffusers.setting_arguments.chosen_settings`; or keyword overrides of the constructor)
        change the DMin settings; the others keep :class:`DMinConfig`'s defaults. Caching always center-crops and never flips, whatever ``center_crop`` / ``random_flip`` say:
        attribution must be deterministic.
        """
        get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
        if not get("center_crop", True) or get("random_flip", False):
            logger.info("DMin caching uses a center crop and no flip (deterministic), unlike the random training augmentations")
        config = DMinConfig(**chosen_settings(args))
        dataset_args = {
            name: get(name)
            for name in ("dataset_name", "dataset_config_name", "train_data_dir", "instance_data_dir",
                         "instance_prompt", "cache_dir", "max_train_samples", "seed")
        }
        settings = {
            "output_dir": os.path.join(get("output_dir") or ".", INDEX_SUBFOLDER),
            "config": config,
            "image_column": get("image_column") or DEFAULT_IMAGE_COLUMN,
            # DreamBooth scripts caption every row with the instance prompt when no caption column is given
            "caption_column": get("caption_column") or DEFAULT_CAPTION_COLUMN,
            "dataset_args": dataset_args,
        }
        settings.update(overrides)
        return cls(**settings)

    def on_train_end(self, accelerator: Any = None, pipeline: Any = None, dataset: Any = None) -> AttributionIndex:
        """Caches every training row with the trained ``pipeline`` (on every process of ``accelerator``) and
        attaches the index to the pipeline, so ``pipeline.attribute(...)`` works right away.

        ``dataset`` is the training ``datasets.Dataset`` (a transform attached with ``with_transform`` is
        dropped); without it, the rows are loaded from the training arguments. An index already in the output
        directory that was built with other settings or on other rows (a training re-run into the same
        ``--output_dir``) is replaced, with a warning: it no longer describes the trained model.
        """
        if pipeline is None:
            raise ValueError("on_train_end needs the trained pipeline (with its LoRA weights, if any)")
        pipeline = enable_attribution(pipeline)
        if dataset is None:
            dataset = load_training_dataset(**self.dataset_args)
        index = cache_dataset(
            pipeline,
            dataset,
            self.output_dir,
            self.config,
            self.image_column,
            self.caption_column,
            accelerator=accelerator,
            dataset_reference=dataset_reference(**self.dataset_args),
            batch_bytes=self.batch_bytes,
            replace_stale=True,
        )
        pipeline.load_attribution_index(index)
        return index
