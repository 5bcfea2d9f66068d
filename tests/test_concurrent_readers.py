"""Readers never mix two indices: while another process overwrites the directory with save_pretrained in a loop,
every ranking a reader returns is the old index's or the new one's (or a clear IndexChangedError), and an index
opened before keeps answering as itself. Threads sharing one index get the sequential results."""

import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

import dmin_diffusers as dm
from dmin_diffusers.gradients import GradientSketcher
from dmin_diffusers.store import IndexChangedError
from tiny_models import make_image_dataset, tiny_pipeline

NUM_ROWS, T, K = 12, 2, 64


def build_from_table(directory, seed):
    """An index of the tiny DDPM whose rows are a fixed random table (seeded): two seeds, two indices."""
    dataset = make_image_dataset(NUM_ROWS)
    generator = torch.Generator().manual_seed(seed)
    table = {}
    for row in range(NUM_ROWS):
        vector = torch.randn(T, K, generator=generator)
        table[dataset[row]["image"].tobytes()] = vector / vector.norm(dim=1, keepdim=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(GradientSketcher, "prepare", lambda self, image, prompt: image.tobytes())
        patch.setattr(GradientSketcher, "sketch_many",
                      lambda self, examples, same_size_batches=False: torch.stack([table[key] for key in examples]))
        config = dm.DMinConfig(num_timesteps=T, projection_dim=K, shard_size=3)
        return tiny_pipeline("ddpm", dm.DMinDDPMPipeline).build_attribution_index(
            dataset, directory, config=config, progress=False
        )


@pytest.fixture(scope="module")
def two_indices(tmp_path_factory):
    root = tmp_path_factory.mktemp("readers")
    return build_from_table(root / "a", 0), build_from_table(root / "b", 1)


QUERIES = [torch.randn(T, K, generator=torch.Generator().manual_seed(100 + i)) for i in range(4)]


def rankings(index):
    return [index.search(query, 5, exact=exact)[0] for query in QUERIES for exact in (True, False)]


WRITER = textwrap.dedent("""
    import os
    import sys
    from pathlib import Path
    import dmin_diffusers as dm
    sources = [dm.AttributionIndex.from_pretrained(path) for path in sys.argv[1:3]]
    target, count = Path(sys.argv[3]), Path(sys.argv[4])
    saves = 0
    while not (target.parent / "stop").exists():
        sources[saves % 2].save_pretrained(target, overwrite=True)
        saves += 1
        count.with_suffix(".new").write_text(str(saves))
        os.replace(count.with_suffix(".new"), count)
""")


def first_count(count, deadline):
    """The writer subprocess's first count of finished writes (waiting for it until ``deadline``)."""
    while not count.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return int(count.read_text())


def test_readers_during_a_writer_never_mix_two_indices(two_indices, tmp_path):
    a, b = two_indices
    expected = {"a": rankings(a), "b": rankings(b)}
    assert expected["a"] != expected["b"]
    target = tmp_path / "served"
    a.save_pretrained(target)
    opened_before = dm.AttributionIndex.from_pretrained(target)
    assert rankings(opened_before) == expected["a"]
    count = tmp_path / "saves"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(a.directory), str(b.directory), str(target),
                               str(count)])
    answered, changed, mixed = 0, 0, []
    try:
        deadline = time.monotonic() + 120
        start_saves = first_count(count, deadline)
        for attempt in range(60):
            try:
                got = rankings(dm.AttributionIndex.from_pretrained(target))
            except IndexChangedError as error:
                assert "open it again" in str(error)
                changed += 1
                continue
            answered += 1
            if got not in expected.values():
                mixed.append(got)
            assert rankings(opened_before) == expected["a"]  # an index keeps reading the files it opened
            if time.monotonic() > deadline:
                break
        saves = int(count.read_text()) - start_saves
    finally:
        (tmp_path / "stop").touch()
        writer.wait(timeout=120)
    assert writer.returncode == 0
    assert not mixed, f"{len(mixed)} of {answered} rankings mixed two indices"
    assert answered >= 30 and saves >= 3, (answered, changed, saves)
    final = dm.AttributionIndex.from_pretrained(target, verify=True)
    assert rankings(final) in expected.values()


def test_threads_sharing_one_index_get_the_sequential_results(two_indices):
    a, _ = two_indices
    expected = rankings(a)
    index = dm.AttributionIndex.from_pretrained(a.directory)  # lazy store and HNSW index: opened by the threads
    results, errors = [], []

    def work():
        try:
            for _ in range(5):
                results.append(rankings(index))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 20 and all(result == expected for result in results)


REFITTER = textwrap.dedent("""
    import os
    import sys
    from pathlib import Path
    import time
    import dmin_diffusers as dm
    from dmin_diffusers.artefacts import KnnArtefact
    save = KnnArtefact.save
    def slow_save(self, value, directory):  # widens the time between the first file written and the manifest
        save(self, value, directory)
        time.sleep(0.2)
    KnnArtefact.save = slow_save
    target, count = Path(sys.argv[1]), Path(sys.argv[2])
    index = dm.AttributionIndex(target)
    refits = 0
    while not (target.parent / "stop").exists():
        index.refit(("centered-kernel", "none")[refits % 2])
        index = dm.AttributionIndex(target)  # the files it wrote are the ones the next refit replaces
        refits += 1
        count.with_suffix(".new").write_text(str(refits))
        os.replace(count.with_suffix(".new"), count)
""")


def test_readers_during_a_refit_get_one_geometry_or_the_other(two_indices, tmp_path):
    """A refit replaces the config and the fitted files as save_pretrained does: a reader opening meanwhile gets
    the old preconditioning's rankings or the new one's, never a false damage report."""
    a, _ = two_indices
    expected = {}
    for method in ("none", "centered-kernel"):
        a.save_pretrained(tmp_path / method)
        copy = dm.AttributionIndex(tmp_path / method)
        copy.refit(method)
        expected[method] = rankings(copy)
    assert expected["none"] != expected["centered-kernel"]
    target = tmp_path / "served" / "index"
    a.save_pretrained(target)
    count = tmp_path / "refits"
    writer = subprocess.Popen([sys.executable, "-c", REFITTER, str(target), str(count)])
    answered, mixed = 0, []
    try:
        deadline = time.monotonic() + 120
        start = first_count(count, deadline)
        refits = 0
        # reads go on until at least three refits happened under them (the writer's pace depends on the CPU)
        while (answered < 20 or refits < 3) and time.monotonic() < deadline:
            try:
                got = rankings(dm.AttributionIndex(target))
            except IndexChangedError:
                continue
            answered += 1
            if got not in expected.values():
                mixed.append(got)
            refits = int(count.read_text()) - start
    finally:
        (target.parent / "stop").touch()
        writer.wait(timeout=120)
    assert writer.returncode == 0
    assert not mixed, f"{len(mixed)} of {answered} rankings were neither geometry's"
    assert answered >= 20 and refits >= 3, (answered, refits)
