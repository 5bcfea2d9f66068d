"""`AttributionResult`: the most influential training rows of one query, and a picture of them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image
from PIL import ImageDraw

from .dataset_rows import HubDatasetRows
from .inputs import to_pil


@dataclass
class AttributionResult:
    """Training rows ranked by their influence on a query image, most influential first.

    Attributes:
        indices: dataset row numbers.
        scores: DMin influence scores: sums over timesteps of the compressed gradients' inner products, in the
            geometry of the index's preconditioning (``DMinConfig.preconditioning``).
        image: the query image.
        prompt: the query prompt (``None`` for unconditional models).
        exact: whether every row was scored (``True``) or HNSW proposed the candidates.
        dataset: the training rows: a ``datasets.Dataset``, a :class:`HubDatasetRows` or ``None``.
        timestep_scores: ``(len(indices), T)`` array: each row's score split over the index's timesteps (its
            sum is the score), to see which noise levels drive a match.
    """

    indices: list[int]
    scores: list[float]
    image: PIL.Image.Image
    prompt: str | None = None
    exact: bool = False
    dataset: Any = field(default=None, repr=False)
    image_column: str | None = field(default=None, repr=False)
    caption_column: str | None = field(default=None, repr=False)
    timestep_scores: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32), repr=False)

    @property
    def examples(self) -> list[dict[str, Any]]:
        """The training rows themselves, most influential first.

        They come from the dataset attached to the index or, for an index without one, from the Hub dataset
        that the index records (name, revision, split; loaded on first use and cached by ``datasets``). ``[]``
        when neither is available: :attr:`examples_unavailable_reason` says why.
        """
        if self.dataset is None:
            return []
        if isinstance(self.dataset, HubDatasetRows) and self.dataset.load() is None:
            return []
        return [self.dataset[int(index)] for index in self.indices]

    @property
    def examples_unavailable_reason(self) -> str | None:
        """Why :attr:`examples` is empty, or ``None`` when the rows are available."""
        if self.dataset is None:
            return (
                "no training dataset is attached to the index; pass dataset=... to load_attribution_index "
                "or AttributionIndex.from_pretrained"
            )
        if isinstance(self.dataset, HubDatasetRows):
            return self.dataset.unavailable_reason
        return None

    def to_image(self, tile_size: int = 128, columns: int | None = None) -> PIL.Image.Image:
        """A grid: the query first, then the top-k training images labelled with rank and score."""
        tiles = [_labelled(self.image, "query", tile_size)]
        images = [row.get(self.image_column) for row in self.examples] if self.image_column else []
        for rank, (index, score) in enumerate(zip(self.indices, self.scores), start=1):
            image = images[rank - 1] if images else None
            tiles.append(_labelled(image, f"#{rank} row {index}  {score:.3f}", tile_size))
        columns = columns or min(len(tiles), 6)
        rows = -(-len(tiles) // columns)
        grid = PIL.Image.new("RGB", (columns * tile_size, rows * (tile_size + 14)), "white")
        for position, tile in enumerate(tiles):
            grid.paste(tile, ((position % columns) * tile_size, (position // columns) * (tile_size + 14)))
        return grid


def _labelled(image: Any, label: str, tile_size: int) -> PIL.Image.Image:
    tile = PIL.Image.new("RGB", (tile_size, tile_size + 14), "white")
    if image is not None:
        picture = to_pil(image).convert("RGB").resize((tile_size, tile_size), PIL.Image.NEAREST)
        tile.paste(picture, (0, 0))
    else:
        ImageDraw.Draw(tile).rectangle((0, 0, tile_size - 1, tile_size - 1), outline="gray")
    ImageDraw.Draw(tile).text((2, tile_size + 1), label, fill="black")
    return tile
