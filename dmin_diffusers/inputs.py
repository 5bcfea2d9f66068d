"""Images to model inputs, with the preprocessing of diffusers' training scripts (PIL + numpy).

The scripts apply ``Resize(resolution, bilinear)``, ``CenterCrop(resolution)``, ``ToTensor()`` and
``Normalize([0.5], [0.5])``; random flips and random crops are left out because attribution must be
deterministic.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import PIL.Image
import torch

ImageInput = Any  # PIL.Image.Image | np.ndarray | torch.Tensor | a one-element list of those


def to_pil(image: ImageInput) -> PIL.Image.Image:
    """Converts one image in any format diffusers pipelines return to PIL.

    Accepts a PIL image, a numpy array ``(H, W)``, ``(H, W, C)`` or ``(1, H, W, C)`` (uint8, or float in
    ``[0, 1]`` as ``output_type="np"`` gives), a torch tensor ``(C, H, W)`` or ``(1, C, H, W)`` (float in
    ``[0, 1]`` as ``output_type="pt"`` gives, or uint8), or a list holding exactly one of these.
    """
    if isinstance(image, (list, tuple)):
        if len(image) != 1:
            raise ValueError(f"expected one image, got a sequence of {len(image)}")
        image = image[0]
    if isinstance(image, PIL.Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        array = image.detach().cpu()
        if array.ndim == 4:
            array = _single(array)
        if array.ndim != 3:
            raise ValueError(f"a torch image must be (C, H, W) or (1, C, H, W), got shape {tuple(image.shape)}")
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


def _single(batch):
    if batch.shape[0] != 1:
        raise ValueError(f"expected a batch of one image, got {batch.shape[0]}")
    return batch[0]


def _array_to_pil(array: np.ndarray) -> PIL.Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape[-1] not in (3, 4):
        raise ValueError(f"an image must have 1, 3 or 4 channels last, got shape {array.shape}")
    if array.dtype == np.uint8:
        return PIL.Image.fromarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"image arrays must be uint8 or float in [0, 1], got {array.dtype}")
    low, high = float(np.min(array)), float(np.max(array))
    if low < -1e-3 or high > 1 + 1e-3:
        raise ValueError(
            f"float images must be in [0, 1] (as diffusers returns them), got values in [{low:.3f}, {high:.3f}]"
        )
    return PIL.Image.fromarray(np.round(np.clip(array, 0.0, 1.0) * 255).astype(np.uint8))


def preprocess_image(
    image: ImageInput, resolution: int, channels: int = 3, center_crop: bool = True
) -> torch.Tensor:
    """One image as a float32 tensor ``(1, channels, resolution, resolution)`` in ``[-1, 1]``."""
    pil = to_pil(image).convert("L" if channels == 1 else "RGB")
    width, height = pil.size
    short = min(width, height)
    new_size = (int(resolution * width / short), int(resolution * height / short))
    if new_size != pil.size:
        pil = pil.resize(new_size, PIL.Image.BILINEAR)
    left = int(round((new_size[0] - resolution) / 2.0)) if center_crop else 0
    top = int(round((new_size[1] - resolution) / 2.0)) if center_crop else 0
    pil = pil.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(pil, dtype=np.float32) / 127.5 - 1.0
    if array.ndim == 2:
        array = array[..., None]
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()
