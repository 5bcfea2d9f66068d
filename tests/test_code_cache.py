"""The compressor's on-disk code cache: round trip, validation, atomic writes, and failures that must not matter."""

import json
import logging
import os
import struct
import time

import numpy as np
import pytest
import torch

from dmin_diffusers import code_cache
from dmin_diffusers import sketch as sketch_module
from dmin_diffusers.sketch import SketchProjector

SIZES = [1000, 2345, 17, 4096]  # 7458 elements, padded to 7488 at K = 64: most positions walk


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv(code_cache.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def all_codes(projector):
    """Every parameter's codes, through the path that sketching takes (codes kept in CPU memory)."""
    return torch.cat([projector.parameter_codes(i, torch.device("cpu"))[0] for i in range(len(SIZES))])


def reference(seed=3):
    return SketchProjector(SIZES, 64, seed, disk_cache=False).codes_for_range(0, sum(SIZES))


def no_derivation(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the codes were derived instead of read from the cache")

    monkeypatch.setattr(SketchProjector, "derive_codes_into", refuse)


def sketch(projector, gradient):
    accumulator = projector.new_accumulator()
    for index, part in enumerate(gradient):
        projector.accumulate(accumulator, index, part)
    return projector.finalize(accumulator)


def test_round_trip_reads_the_file_instead_of_deriving(cache_root, monkeypatch):
    first = SketchProjector(SIZES, 64, seed=3, disk_cache=True)
    codes = all_codes(first)
    assert torch.equal(codes, reference())
    files = list((cache_root / "codes").iterdir())
    assert [f.name for f in files] == [code_cache.cache_path(first).name]
    assert files[0].stat().st_size == 4096 + 4 * sum(SIZES)  # header page, then raw int32
    gradient = [torch.randn(size, generator=torch.Generator().manual_seed(size)) for size in SIZES]
    recomputed = sketch(SketchProjector(SIZES, 64, seed=3, code_cache_bytes=0), gradient)
    no_derivation(monkeypatch)
    second = SketchProjector(SIZES, 64, seed=3, disk_cache=True)
    assert torch.equal(all_codes(second), codes)
    assert isinstance(second._cpu_codes, np.memmap)
    assert torch.equal(sketch(second, gradient), recomputed)


def header_of(data):
    assert data[:8] == b"DMINCODE"
    (length,) = struct.unpack("<I", data[8:12])
    return json.loads(data[12 : 12 + length])


def test_the_file_is_raw_little_endian_int32_after_a_json_header(cache_root):
    projector = SketchProjector(SIZES, 64, seed=3, disk_cache=True)
    all_codes(projector)
    data = code_cache.cache_path(projector).read_bytes()
    header = header_of(data)
    assert header["key"] == code_cache.cache_key(3, 64, sum(SIZES))
    assert (header["seed"], header["dim"], header["total"], header["format"]) == (3, 64, sum(SIZES), 1)
    codes = np.frombuffer(data[header["data_offset"] :], dtype="<i4")
    assert torch.equal(torch.from_numpy(codes.copy()), reference())


def test_pieces_written_while_deriving_give_the_file_of_one_write(cache_root, monkeypatch):
    monkeypatch.setattr(sketch_module, "_STORE_PIECE", 1000)  # 8 pieces, the last one of odd length
    projector = SketchProjector(SIZES, 64, seed=3, disk_cache=True)
    all_codes(projector)
    path = code_cache.cache_path(projector)
    pieces = path.read_bytes()
    path.unlink()
    code_cache.store_codes(projector, reference().numpy())
    whole = path.read_bytes()
    assert pieces[4096:] == whole[4096:]
    headers = [header_of(data) for data in (pieces, whole)]
    for header in headers:
        header.pop("created")
    assert headers[0] == headers[1]


def test_the_key_separates_seeds_dimensions_and_totals(cache_root):
    for seed, dim, sizes in ((3, 64, SIZES), (4, 64, SIZES), (3, 128, SIZES), (3, 64, SIZES + [1])):
        projector = SketchProjector(sizes, dim, seed, disk_cache=True)
        projector.parameter_codes(0, torch.device("cpu"))
    assert len(list((cache_root / "codes").iterdir())) == 4
    # the codes depend on the total only, not on how it splits into parameters
    split = SketchProjector([sum(SIZES) - 1, 1], 64, seed=3, disk_cache=True)
    assert code_cache.cache_path(split) == code_cache.cache_path(SketchProjector(SIZES, 64, 3))


def corrupt(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[:-4]
    elif how == "one code changed":
        data[4096 + 4 * 5000] ^= 1
    elif how == "codes swapped for another seed's":  # a consistent header and checksum, the wrong codes
        other = SketchProjector(SIZES, 64, seed=4).codes_for_range(0, sum(SIZES)).numpy()
        code_cache.store_codes(SketchProjector(SIZES, 64, seed=3), other)
        return
    elif how == "header of another seed":
        text = data[:4096].replace(b'"seed": 3', b'"seed": 4')
        data[:4096] = text
    elif how == "not a cache file":
        data = bytearray(b"garbage" * 10)
    elif how == "bad json":
        data[14] = ord("}")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "one code changed", "codes swapped for another seed's",
                                 "header of another seed", "not a cache file", "bad json"])
def test_an_invalid_file_is_detected_and_derived_again(cache_root, caplog, how):
    all_codes(SketchProjector(SIZES, 64, seed=3, disk_cache=True))
    path = code_cache.cache_path(SketchProjector(SIZES, 64, seed=3))
    corrupt(path, how)
    with caplog.at_level(logging.WARNING, logger="dmin_diffusers.code_cache"):
        again = SketchProjector(SIZES, 64, seed=3, disk_cache=True)
        assert torch.equal(all_codes(again), reference())
    assert "ignoring the cached compressor codes" in caplog.text
    assert code_cache.load_codes(again) is not None  # rewritten, valid again


def test_an_unwritable_cache_directory_only_costs_the_derivation(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a file"
    blocker.write_text("not a directory")  # works as root too, unlike a read-only mode
    monkeypatch.setenv(code_cache.CACHE_ENV, str(blocker))
    with caplog.at_level(logging.WARNING, logger="dmin_diffusers.code_cache"):
        projector = SketchProjector(SIZES, 64, seed=3, disk_cache=True)
        assert torch.equal(all_codes(projector), reference())
    assert "could not cache the compressor's codes" in caplog.text


def test_a_full_disk_is_not_filled_further(cache_root, monkeypatch, caplog):
    monkeypatch.setattr(code_cache.shutil, "disk_usage", lambda path: type("U", (), {"free": 1 << 20})())
    with caplog.at_level(logging.WARNING, logger="dmin_diffusers.code_cache"):
        assert torch.equal(all_codes(SketchProjector(SIZES, 64, seed=3, disk_cache=True)), reference())
    assert "GiB free" in caplog.text
    assert list((cache_root / "codes").iterdir()) == []


def test_an_interrupted_write_leaves_no_file_that_loads(cache_root, monkeypatch, caplog):
    monkeypatch.setattr(code_cache, "_WRITE_CHUNK", 1000)
    calls = []

    def failing_fsync(descriptor):
        calls.append(descriptor)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(code_cache.os, "fsync", failing_fsync)
    with caplog.at_level(logging.WARNING, logger="dmin_diffusers.code_cache"):
        assert torch.equal(all_codes(SketchProjector(SIZES, 64, seed=3, disk_cache=True)), reference())
    assert calls and "No space left" in caplog.text
    assert list((cache_root / "codes").iterdir()) == []  # neither the file nor the temporary one


def test_a_derivation_interrupted_half_way_leaves_nothing_in_the_cache(cache_root, monkeypatch):
    monkeypatch.setattr(sketch_module, "_STORE_PIECE", 1000)
    derive = SketchProjector.derive_codes_into
    calls = []

    def interrupted(self, start, out):
        calls.append(start)
        if len(calls) == 3:
            raise KeyboardInterrupt
        derive(self, start, out)

    monkeypatch.setattr(SketchProjector, "derive_codes_into", interrupted)
    with pytest.raises(KeyboardInterrupt):
        all_codes(SketchProjector(SIZES, 64, seed=3, disk_cache=True))
    assert calls == [0, 1000, 2000]  # two pieces were written before the interruption
    assert list((cache_root / "codes").iterdir()) == []
    monkeypatch.setattr(SketchProjector, "derive_codes_into", derive)
    assert torch.equal(all_codes(SketchProjector(SIZES, 64, seed=3, disk_cache=True)), reference())
    assert len(list((cache_root / "codes").iterdir())) == 1


def test_temporary_files_of_killed_writers_are_removed(cache_root):
    directory = cache_root / "codes"
    directory.mkdir(parents=True)
    stale, fresh = directory / ".x.codes.1.codes.tmp", directory / ".x.codes.2.codes.tmp"
    for leftover in (stale, fresh):
        leftover.write_bytes(b"partial")
    os.utime(stale, (time.time() - 2 * 3600,) * 2)
    all_codes(SketchProjector(SIZES, 64, seed=3, disk_cache=True))
    assert not stale.exists() and fresh.exists()  # a fresh one may be another process writing right now


def test_small_models_and_a_disabled_cache_write_nothing(cache_root, monkeypatch):
    all_codes(SketchProjector(SIZES, 64, seed=3))  # below MIN_CACHED_ELEMENTS
    assert not (cache_root / "codes").exists()
    monkeypatch.setattr(code_cache, "MIN_CACHED_ELEMENTS", 1000)
    for value in ("off", "0", ""):
        monkeypatch.setenv(code_cache.CACHE_ENV, value)
        assert code_cache.code_cache_dir() is None
        assert torch.equal(all_codes(SketchProjector(SIZES, 64, seed=3)), reference())
    monkeypatch.setenv(code_cache.CACHE_ENV, str(cache_root))
    all_codes(SketchProjector(SIZES, 64, seed=3))  # above the (patched) threshold
    assert len(list((cache_root / "codes").iterdir())) == 1
    # codes that do not fit the in-memory budget are recomputed per gradient and never cached
    monkeypatch.setenv(code_cache.CACHE_ENV, str(cache_root / "other"))
    SketchProjector(SIZES, 64, seed=3, code_cache_bytes=0).parameter_codes(0, torch.device("cpu"))
    assert not (cache_root / "other").exists()


def test_the_default_directory_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv(code_cache.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert code_cache.code_cache_dir() == tmp_path / "xdg" / "dmin_diffusers" / "codes"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert code_cache.code_cache_dir() == tmp_path / "home" / ".cache" / "dmin_diffusers" / "codes"


def test_tests_never_write_into_the_real_home_cache():
    assert os.environ[code_cache.CACHE_ENV] != ""
    assert not str(code_cache.code_cache_dir()).startswith(os.path.expanduser("~/.cache"))
