"""Faults never cost data: an interrupt (KeyboardInterrupt) or a full disk at any write of a build leaves a
directory that the same call resumes to the same rows, and a failed save_pretrained never blocks the next one nor
breaks the index it was replacing.

Each fault is injected at the n-th call of one write primitive, for n = 1, 2, ... until the call completes
without reaching it. The gradients of the tiny DDPM are replaced by a fixed table of vectors for the loops (the
store is under test, not the gradients; a real build takes seconds here); one test runs the issue's case with
real gradients."""

import builtins
import errno
import os
from contextlib import contextmanager

import hnswlib
import pytest
import torch

import dmin_diffusers as dm
import dmin_diffusers.index as index_module
import dmin_diffusers.store as store_module
from dmin_diffusers.build_directory import STAGING_NAME
from dmin_diffusers.caching import cache_dataset
from dmin_diffusers.gradients import GradientSketcher
from dmin_diffusers.store import DiskFullError
from tiny_models import make_image_dataset, tiny_pipeline

NUM_ROWS = 8
T, K = 2, 64


def config():
    return dm.DMinConfig(num_timesteps=T, projection_dim=K, shard_size=2)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("ddpm", dm.DMinDDPMPipeline)


@pytest.fixture(scope="module")
def dataset():
    return make_image_dataset(NUM_ROWS)


@pytest.fixture
def table_gradients(monkeypatch, dataset):
    """Rows' vectors from a fixed table keyed by the image's pixels: a build then costs milliseconds."""
    generator = torch.Generator().manual_seed(0)
    table = {}
    for row in range(NUM_ROWS):
        vector = torch.randn(T, K, generator=generator)
        table[dataset[row]["image"].tobytes()] = vector / vector.norm(dim=1, keepdim=True)
    monkeypatch.setattr(GradientSketcher, "prepare", lambda self, image, prompt: image.tobytes())
    monkeypatch.setattr(GradientSketcher, "sketch_many",
                        lambda self, examples, same_size_batches=False: torch.stack([table[key] for key in examples]))


def build(pipe, dataset, directory):
    return cache_dataset(pipe, dataset, directory, config(), progress=False)


def rows_of(directory) -> torch.Tensor:
    index = dm.AttributionIndex.from_pretrained(directory, verify=True)
    assert sorted(index.store.row_ids.tolist()) == list(range(NUM_ROWS))
    return index.store.get_rows(list(range(NUM_ROWS)))


def _is_write(args, kwargs) -> bool:
    mode = args[1] if len(args) > 1 else kwargs.get("mode", "r")
    return any(flag in mode for flag in "wax+")


# name: (object, attribute, which calls count)
PRIMITIVES = {
    "os.replace": (os, "replace", None),
    "os.fsync": (os, "fsync", None),
    "save_file": (store_module, "save_file", None),
    "write_json_atomic": (store_module, "write_json_atomic", None),
    "hnswlib save_index": (hnswlib.Index, "save_index", None),
    "open for writing": (builtins, "open", _is_write),
}


@contextmanager
def fault_at(name: str, n: int, error: BaseException, after: bool = False):
    """Raises ``error`` at the ``n``-th call of the primitive (before it runs, or just after it returned)."""
    owner, attribute, counts = PRIMITIVES[name]
    original = getattr(owner, attribute)
    calls = []

    def faulty(*args, **kwargs):
        if counts is not None and not counts(args, kwargs):
            return original(*args, **kwargs)
        calls.append(1)
        if len(calls) == n and not after:
            raise error
        result = original(*args, **kwargs)
        if len(calls) == n:
            raise error
        return result

    patch = pytest.MonkeyPatch()
    patch.setattr(owner, attribute, faulty)
    if name == "write_json_atomic":  # index.py imports it by name
        patch.setattr(index_module, "write_json_atomic", faulty)
    try:
        yield calls
    finally:
        patch.undo()


@pytest.fixture
def reference(table_gradients, pipe, dataset, tmp_path):
    build(pipe, dataset, tmp_path / "reference")
    return rows_of(tmp_path / "reference")


# an interrupt just after a write, too, where that leaves a state no "before" case does (a file renamed into place
# but not yet recorded)
CASES = [(name, False) for name in PRIMITIVES] + [("os.replace", True), ("write_json_atomic", True)]


@pytest.mark.parametrize("name,after", CASES, ids=[f"{n}-{'after' if a else 'before'}" for n, a in CASES])
def test_an_interrupt_at_any_write_of_a_build_resumes_to_the_same_rows(name, after, reference, pipe, dataset,
                                                                        tmp_path):
    for n in range(1, 200):
        directory = tmp_path / f"build-{n}"
        with fault_at(name, n, KeyboardInterrupt(), after=after) as calls:
            try:
                build(pipe, dataset, directory)
                interrupted = False
            except KeyboardInterrupt:
                interrupted = True
        if not interrupted:
            assert len(calls) < n
            break
        build(pipe, dataset, directory)  # the same call again, without a fault
        assert torch.equal(rows_of(directory), reference), (name, n)
    assert n > 1, f"{name} was never called"


@pytest.mark.parametrize("name", ["save_file", "write_json_atomic", "hnswlib save_index", "open for writing"])
def test_a_full_disk_is_a_clear_error_and_the_resume_gives_the_same_rows(name, reference, pipe, dataset, tmp_path):
    for n in range(1, 200):
        directory = tmp_path / f"build-{n}"
        full = OSError(errno.ENOSPC, "No space left on device")
        with fault_at(name, n, full) as calls:
            try:
                build(pipe, dataset, directory)
                failed = None
            except OSError as error:
                failed = error
        if failed is None:
            assert len(calls) < n
            break
        assert isinstance(failed, DiskFullError), repr(failed)
        message = str(failed)
        assert str(directory) in message and "no space left" in message
        assert "kept" in message or "nothing was computed yet" in message
        assert "\n" not in message
        build(pipe, dataset, directory)
        assert torch.equal(rows_of(directory), reference), (name, n)
    assert n > 1


def test_the_issue_case_with_real_gradients(pipe, dataset, tmp_path, monkeypatch):
    """Ctrl-C while a vectors/part-*.json is rewritten: the cleanup flush used to store the pending rows twice,
    and every later run failed with "a dataset row is stored twice"."""
    clean = build(pipe, dataset, tmp_path / "clean").store.get_rows(list(range(NUM_ROWS)))
    directory = tmp_path / "interrupted"
    with fault_at("write_json_atomic", 4, KeyboardInterrupt(), after=True):  # 2 metadata files, then the parts
        with pytest.raises(KeyboardInterrupt):
            build(pipe, dataset, directory)
    resumed = build(pipe, dataset, directory)
    assert resumed.num_rows == NUM_ROWS
    assert torch.equal(resumed.store.get_rows(list(range(NUM_ROWS))), clean)


# ---------------------------------------------------------------------------------------------- save_pretrained


def _manifest(directory):
    return dm.AttributionIndex.from_pretrained(directory, verify=True).manifest


SAVE_FAULTS = [("os.replace", KeyboardInterrupt()), ("open for writing", KeyboardInterrupt()),
               ("write_json_atomic", OSError(errno.ENOSPC, "No space left on device")),
               ("os.fsync", KeyboardInterrupt())]


@pytest.mark.parametrize("name,error", SAVE_FAULTS, ids=[name for name, _ in SAVE_FAULTS])
def test_a_failed_save_never_blocks_the_next_nor_breaks_the_index_it_replaces(name, error, table_gradients, pipe,
                                                                              dataset, tmp_path):
    first = build(pipe, dataset, tmp_path / "a")
    second = build(pipe, dataset.select(range(NUM_ROWS - 2)), tmp_path / "b")
    expected = {"a": _manifest(first.directory), "b": _manifest(second.directory)}
    reached = False
    for n in range(1, 200):
        fresh, existing = tmp_path / f"fresh-{n}", tmp_path / f"existing-{n}"
        second.save_pretrained(existing)
        for target, overwrite in ((fresh, False), (existing, True)):
            with fault_at(name, n, error) as calls:
                try:
                    first.save_pretrained(target, overwrite=overwrite)
                    failed = False
                except (KeyboardInterrupt, OSError):
                    failed = True
            reached = reached or failed
            if failed and overwrite:  # the old index or the new one, whole and verified; never a mix
                before = _manifest(target)
                assert before["shards"] in (expected["b"]["shards"], expected["a"]["shards"])
            if failed:
                first.save_pretrained(target, overwrite=overwrite)  # never refused, never stale-locked
            assert _manifest(target)["shards"] == expected["a"]["shards"]
            assert not (target / STAGING_NAME).exists()
        if len(calls) < n:
            break
    assert reached
