"""Images to model inputs, with the preprocessing of diffusers' training scripts (PIL + numpy).

The scripts apply ``Resize(resolution, interpolation)`` (the text-to-image scripts' ``--image_interpolation_mode``,
default lanczos; ``train_dreambooth.py`` and the SD3 / Flux DreamBooth scripts: bilinear), ``CenterCrop(resolution)``, ``ToTensor()`` and
``Normalize([0.5], [0.5])``; random flips and random crops are left out because attribution must be
deterministic. torchvision resizes a PIL image with PIL's own filter, so PIL gives the same pixels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

from .config import INTERPOLATION_MODES, check_integer

ImageInput = Any  # PIL.Image.Image | np.ndarray | torch.Tensor | a one-element list of those


#: PIL modes holding 16-bit values (a 16-bit PNG opens as "I;16" or "I"): scaled by 65535, not clipped at 255
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
CHANNEL_COUNTS = (1, 3, 4)
#: the PIL filter torchvision uses for each of its interpolation modes on a PIL image
PIL_FILTERS = {
    "bilinear": PIL.Image.BILINEAR, "bicubic": PIL.Image.BICUBIC, "box": PIL.Image.BOX, "nearest": PIL.Image.NEAREST,
    "nearest_exact": PIL.Image.NEAREST, "hamming": PIL.Image.HAMMING, "lanczos": PIL.Image.LANCZOS,
}
assert set(PIL_FILTERS) == set(INTERPOLATION_MODES)


def to_pil(image: ImageInput) -> PIL.Image.Image:
    """Converts one image in any format diffusers pipelines return to PIL.

    Accepts a PIL image (16-bit ones are scaled to 8 bits), a numpy array ``(H, W)``, ``(H, W, C)`` or
    ``(1, H, W, C)`` (channels last: uint8, uint16, or float in ``[0, 1]`` as ``output_type="np"`` gives), a torch
    tensor ``(C, H, W)`` or ``(1, C, H, W)`` (channels first: float in ``[0, 1]`` as ``output_type="pt"`` gives,
    or uint8 / uint16), or a list holding exactly one of these. ``C`` is 1, 3 or 4. Empty images, NaN or infinite
    values and channels-last torch tensors are refused with a ``ValueError``.
    """
    if isinstance(image, (list, tuple)):
        if len(image) != 1:
            raise ValueError(f"expected one image, got a sequence of {len(image)}")
        image = image[0]
    if isinstance(image, PIL.Image.Image):
        _check_size(*image.size[::-1])
        return _array_to_pil(np.asarray(image), sixteen_bit=True) if image.mode in SIXTEEN_BIT_MODES else image
    if isinstance(image, torch.Tensor):
        array = image.detach().cpu()
        if array.ndim == 4:
            array = _single(array)
        if array.ndim != 3:
            raise ValueError(f"a torch image must be (C, H, W) or (1, C, H, W), got shape {tuple(image.shape)}")
        _check_channels_first(tuple(image.shape), tuple(array.shape))
        array = array.permute(1, 2, 0).float().numpy() if array.is_floating_point() else array.permute(1, 2, 0).numpy()
    elif isinstance(image, np.ndarray):
        array = image
        if array.ndim == 4:
            array = _single(array)
        if array.ndim not in (2, 3):
            raise ValueError(f"a numpy image must be (H, W), (H, W, C) or (1, H, W, C), got shape {image.shape}")
    else:
        raise TypeError(f"image must be a PIL image, numpy array or torch tensor, got {type(image).__name__}")
    return _array_to_pil(array)


def open_image(path: str | os.PathLike) -> PIL.Image.Image:
    """Opens an image file as a ``datasets`` Image feature decodes it: loaded at once, and turned upright by its
    EXIF orientation (a photo's rows were oriented so when they were cached, so a query file must be too)."""
    image = PIL.Image.open(path)
    image.load()
    if image.getexif().get(PIL.Image.ExifTags.Base.Orientation) is not None:
        image = PIL.ImageOps.exif_transpose(image)
    return image


def _single(batch):
    if batch.shape[0] != 1:
        raise ValueError(f"expected a batch of one image, got {batch.shape[0]}")
    return batch[0]


def _check_size(height: int, width: int) -> None:
    if height == 0 or width == 0:
        raise ValueError(f"the image is empty: it is {width}x{height} pixels (width x height); pass a non-empty image")


def _check_channels_first(shape: tuple[int, ...], chw: tuple[int, ...]) -> None:
    """Refuses a torch image whose first dimension is not 1, 3 or 4 channels (a channels-last one, most often)."""
    if chw[0] in CHANNEL_COUNTS:
        return
    layouts = (
        "torch images are channels-first, (C, H, W) or (1, C, H, W) with C = 1, 3 or 4, as output_type='pt' "
        "gives (numpy images are channels-last, (H, W, C))"
    )
    if chw[-1] in CHANNEL_COUNTS:
        raise ValueError(
            f"{layouts}; this tensor of shape {shape} looks channels-last: pass image.permute(2, 0, 1) for (H, W, C) "
            "or image.permute(0, 3, 1, 2) for (1, H, W, C), or a numpy array"
        )
    raise ValueError(f"{layouts}; got shape {shape}")


def _array_to_pil(array: np.ndarray, sixteen_bit: bool = False) -> PIL.Image.Image:
    """A channels-last array as an 8-bit PIL image: uint8 as is, uint16 (or, with ``sixteen_bit``, the int32 of
    PIL's mode "I") scaled by 65535, float checked to be finite and in ``[0, 1]``."""
    _check_size(*array.shape[:2])
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape[-1] not in (3, 4):
        hint = (
            ": it looks channels-first, transpose it with array.transpose(1, 2, 0)"
            if array.shape[0] in CHANNEL_COUNTS else ""
        )
        raise ValueError(
            f"numpy images are channels-last and must have 1, 3 or 4 channels, got shape {array.shape}{hint}"
        )
    if array.dtype == np.uint8:
        return PIL.Image.fromarray(array)
    if sixteen_bit or (array.dtype.kind == "u" and array.dtype.itemsize == 2):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 65535:
            raise ValueError(f"a 16-bit image must hold values in [0, 65535], got values in [{low}, {high}]")
        return PIL.Image.fromarray(np.round(array.astype(np.float64) * (255 / 65535)).astype(np.uint8))
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"image arrays must be uint8 or float in [0, 1] (or uint16), got {array.dtype}")
    if not np.isfinite(array).all():
        raise ValueError(
            "the image contains NaN or infinite values (a diverged generation?); no attribution can be computed for it"
        )
    low, high = float(np.min(array)), float(np.max(array))
    if low < -1e-3 or high > 1 + 1e-3:
        raise ValueError(
            f"float images must be in [0, 1] (as diffusers returns them), got values in [{low:.3f}, {high:.3f}]"
        )
    return PIL.Image.fromarray(np.round(np.clip(array, 0.0, 1.0) * 255).astype(np.uint8))


@dataclass(frozen=True)
class CropGeometry:
    """Where the training crop of an image lies, in the terms SDXL's training scripts record it: the image's
    ``(height, width)`` before resizing, the ``(top, left)`` corner of the crop in the resized image, and the crop's
    ``(height, width)``; and the resized image's ``(height, width)``."""

    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]
    resized_size: tuple[int, int]


def crop_geometry(width: int, height: int, resolution: int, center_crop: bool = True) -> CropGeometry:
    """The crop of the training scripts for a ``width`` x ``height`` image: the short side is resized to
    ``resolution`` (the long side to ``int(resolution * long / short)``), then the center (or the top-left corner)
    ``resolution`` x ``resolution`` square is cut."""
    short = min(width, height)
    new_width, new_height = int(resolution * width / short), int(resolution * height / short)
    top = max(0, int(round((new_height - resolution) / 2.0))) if center_crop else 0
    left = max(0, int(round((new_width - resolution) / 2.0))) if center_crop else 0
    return CropGeometry((height, width), (top, left), (resolution, resolution), (new_height, new_width))


def preprocess_image(
    image: ImageInput, resolution: int, channels: int = 3, center_crop: bool = True, interpolation: str = "bilinear"
) -> torch.Tensor:
    """One image as a float32 tensor ``(1, channels, resolution, resolution)`` in ``[-1, 1]``, resized with the
    ``interpolation`` filter (one of ``INTERPOLATION_MODES``) and cropped as :func:`crop_geometry` says."""
    return preprocess_with_geometry(image, resolution, channels, center_crop, interpolation)[0]


def preprocess_with_geometry(
    image: ImageInput, resolution: int, channels: int = 3, center_crop: bool = True, interpolation: str = "bilinear"
) -> tuple[torch.Tensor, CropGeometry]:
    """:func:`preprocess_image`, and the :class:`CropGeometry` of the crop it took."""
    resolution = check_integer("resolution", resolution, 1)
    if interpolation not in PIL_FILTERS:
        raise ValueError(f"interpolation must be one of {INTERPOLATION_MODES}, got {interpolation!r}")
    pil = to_pil(image).convert("L" if channels == 1 else "RGB")
    geometry = crop_geometry(*pil.size, resolution, center_crop)
    new_size = geometry.resized_size[::-1]  # PIL sizes are (width, height)
    if new_size != pil.size:
        pil = pil.resize(new_size, PIL_FILTERS[interpolation])
    top, left = geometry.crop_top_left
    pil = pil.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(pil, dtype=np.float32) / 127.5 - 1.0
    if array.ndim == 2:
        array = array[..., None]
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous(), geometry
