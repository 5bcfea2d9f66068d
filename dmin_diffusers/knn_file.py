"""Validation of an hnswlib index file against the attribution index it belongs to, before hnswlib reads it.

hnswlib trusts its file: a wrong dimension, a huge element size or a neighbour id out of range makes it allocate
without bound, read past its buffers or crash. :func:`check_knn_file` parses the whole file (hnswlib 0.7-0.8
layout, the one ``hnswlib.Index.save_index`` writes) and checks every size, count and id against the config and
the stored rows, so a damaged or foreign file gives a ``ValueError`` that names it.

Layout: a 96-byte header (below), then ``count`` level-0 records of ``size_data_per_element`` bytes (a link
list: a 2-byte neighbour count, a 2-byte flags field and ``maxM0`` 4-byte ids; the float32 vector; the 8-byte
label), then for each element a 4-byte byte count and its upper-level link lists of ``4 + 4 * maxM`` bytes each.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

# offsetLevel0, max_elements, cur_element_count, size_data_per_element, label_offset, offsetData (size_t),
# maxlevel (int), enterpoint_node (uint32), maxM, maxM0, M (size_t), mult (double), ef_construction (size_t)
_HEADER = struct.Struct("<QQQQQQiIQQQdQ")
_LABEL_BYTES = 8
_CHUNK_ROWS = 1 << 15


def check_knn_file(
    path: str | os.PathLike,
    dim: int,
    row_ids: np.ndarray,
    m: int,
    ef_construction: int,
    name: str | None = None,
) -> None:
    """Raises ``ValueError`` naming ``path`` unless it is an hnswlib inner-product index of ``dim`` float32
    values per element over exactly the rows ``row_ids``, built with ``M = m``, whose graph only links existing
    elements. Nothing is loaded into hnswlib; level 0 is read through a memory map, in chunks. ``name``: the
    file's name in messages (default: that of ``path``)."""
    path = Path(path)
    name = name or path.name  # ``path`` may be a pinned file (/proc/self/fd/N): messages name the index file
    size = path.stat().st_size
    if size < _HEADER.size:
        raise ValueError(f"{name} has {size} bytes, less than an hnswlib header ({_HEADER.size}): truncated")
    with open(path, "rb") as handle:
        header = handle.read(_HEADER.size)
    (offset_level0, _max_elements, count, size_per_element, label_offset, offset_data, max_level, entry_point,
     max_m, max_m0, header_m, _mult, header_ef) = _HEADER.unpack(header)
    links0 = 4 + 4 * 2 * m
    expected = {
        "element count": (count, len(row_ids)),
        "M": (header_m, m),
        "maxM": (max_m, m),
        "maxM0": (max_m0, 2 * m),
        "ef_construction": (header_ef, max(ef_construction, m)),
        "level-0 offset": (offset_level0, 0),
        "vector offset": (offset_data, links0),
        "bytes per element": (size_per_element, links0 + 4 * dim + _LABEL_BYTES),
        "label offset": (label_offset, links0 + 4 * dim),
    }
    for field, (found, wanted) in expected.items():
        if found != wanted:
            hint = f" (the vectors have {dim} values)" if field in ("bytes per element", "label offset") else ""
            raise ValueError(f"{name}: {field} is {found}, expected {wanted}{hint}; not this index's HNSW file")
    level0_end = _HEADER.size + count * size_per_element
    if size < level0_end + 4 * count:
        raise ValueError(f"{name} has {size} bytes, too few for {count} elements: truncated")
    with open(path, "rb") as handle:  # the upper levels: about 1/M of the elements, a small part of the file
        handle.seek(level0_end)
        upper = handle.read()
    levels = _walk_upper_levels(upper, name, count, 4 + 4 * m)
    if count and (
        not 0 <= entry_point < count or max_level != int(levels.max()) or levels[entry_point] != max_level
    ):
        raise ValueError(f"{name}: the entry point ({entry_point}, level {max_level}) is inconsistent: damaged")
    level0 = np.memmap(path, dtype=np.uint8, mode="r", offset=_HEADER.size, shape=(count, size_per_element))
    _check_level0(level0, name, count, 2 * m, label_offset, row_ids)


def _walk_upper_levels(upper: bytes, name: str, count: int, block: int) -> np.ndarray:
    """Follows the per-element byte counts after level 0 to the end of the file, checking each link list."""
    levels = np.zeros(count, dtype=np.int64)
    position, size = 0, len(upper)
    max_m = (block - 4) // 4
    read_length = struct.Struct("<I").unpack_from
    for element in range(count):
        if position + 4 > size:
            raise ValueError(f"{name} ends inside the link lists of element {element}: truncated")
        (length,) = read_length(upper, position)
        position += 4
        if length:
            if length % block or position + length > size:
                raise ValueError(f"{name}: element {element} has {length} bytes of upper-level links: damaged")
            levels[element] = length // block
            lists = np.frombuffer(upper, dtype=np.uint32, count=length // 4, offset=position).reshape(-1, max_m + 1)
            _check_links(name, lists, max_m, count)
            position += length
    if position != size:
        raise ValueError(f"{name} has {size - position} bytes after the last element: damaged or not hnswlib")
    return levels


def _check_links(name: str, lists: np.ndarray, capacity: int, count: int) -> None:
    """``lists``: rows of ``[header, id_1 .. id_capacity]`` (uint32); the low 16 header bits hold the number of
    links, the next 8 the deletion mark (never set in these indices)."""
    sizes = lists[:, 0] & 0xFFFF
    if (lists[:, 0] >> 16).any():
        raise ValueError(f"{name}: an element is marked deleted or has unknown flags")
    if (sizes > capacity).any():
        raise ValueError(f"{name}: a link list holds more than {capacity} links: damaged")
    used = np.arange(capacity)[None, :] < sizes[:, None]
    if (lists[:, 1:][used] >= count).any():
        raise ValueError(f"{name}: a link points past the {count} elements: damaged")


def _check_level0(level0: np.ndarray, name: str, count: int, max_m0: int, label_offset: int, row_ids) -> None:
    """Checks the level-0 link lists and that the labels are exactly the stored row ids (read in chunks)."""
    labels = np.empty(count, dtype=np.int64)
    links_bytes = 4 * (max_m0 + 1)
    for start in range(0, count, _CHUNK_ROWS):
        block = level0[start : start + _CHUNK_ROWS]
        _check_links(name, np.ascontiguousarray(block[:, :links_bytes]).view(np.uint32), max_m0, count)
        raw = np.ascontiguousarray(block[:, label_offset : label_offset + _LABEL_BYTES]).view(np.uint64)[:, 0]
        labels[start : start + len(block)] = raw.astype(np.int64)
    if not np.array_equal(np.sort(labels), np.sort(np.asarray(row_ids, dtype=np.int64))):
        raise ValueError(f"{name}: its element labels are not the stored row ids; it belongs to another index")
