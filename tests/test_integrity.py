"""An index never returns a wrong ranking without an error: damaged files, edited configs, other input models,
another dataset, and concurrent writers are all refused with a message that names the problem."""

import contextlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import dmin_diffusers as dm
from dmin_diffusers.locks import IndexBusyError, index_write_lock
from dmin_diffusers.artefacts import ARTEFACT_FILES
from dmin_diffusers.search import KNN_FILES
from dmin_diffusers.store import IndexIntegrityError
from tiny_models import make_caption_dataset, tiny_pipeline

NUM_ROWS = 6


def config(**kwargs):
    return dm.DMinConfig(num_timesteps=2, projection_dim=256, shard_size=2, **kwargs)


def sd_pipeline(**kwargs):
    return tiny_pipeline("stable-diffusion", dm.DMinStableDiffusionPipeline, lora_rank=4, **kwargs)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    pipe, dataset = sd_pipeline(), make_caption_dataset(NUM_ROWS)
    directory = tmp_path_factory.mktemp("index") / "index"
    pipe.build_attribution_index(dataset, directory, config=config(), progress=False)
    return pipe, dataset, directory


def use_on_the_default_path(pipe, dataset, directory):
    """What a user does: attach the index, then attribute every training row (HNSW, the default) and one exact."""
    pipe.load_attribution_index(directory, dataset=dataset)
    for row in range(NUM_ROWS):
        result = pipe.attribute(dataset[row]["image"], dataset[row]["text"], top_k=2)
        assert result.indices[0] == row
    pipe.attribute(dataset[0]["image"], dataset[0]["text"], top_k=2, exact=True)


def test_the_untouched_index_works(built, tmp_path):
    pipe, dataset, directory = built
    use_on_the_default_path(pipe, dataset, directory)


def test_every_damaged_file_is_detected_on_the_default_path(built, tmp_path):
    """Flip one byte at several offsets of every file, truncate it, delete it: each is reported as an error
    before any ranking is returned."""
    pipe, dataset, source = built
    index = dm.AttributionIndex.from_pretrained(source)
    names = index.files()
    fitted = [name for name in ARTEFACT_FILES if name != "preconditioner.safetensors" or
              index.config.preconditioning != "none"]
    assert {"dmin_config.json", "dataset.json", "manifest.json", *fitted} <= set(names)
    assert len(names) == 6 + len(fitted)  # and 3 shards
    undetected, trials = [], 0
    for name in names:
        size = (source / name).stat().st_size
        offsets = sorted({0, 1, size // 3, size // 2, (2 * size) // 3, size - 2, size - 1})
        damages = [("flip", offset) for offset in offsets]
        damages += [("truncate", size // 2), ("delete", 0)]
        for kind, offset in damages:
            copy = tmp_path / f"{kind}-{offset}-{name.replace('/', '_')}"
            index.save_pretrained(copy)
            path = copy / name
            data = bytearray(path.read_bytes())
            if kind == "flip":
                data[offset] ^= 0x01
                path.write_bytes(bytes(data))
            elif kind == "truncate":
                path.write_bytes(bytes(data[:offset]))
            else:
                path.unlink()
            trials += 1
            try:
                use_on_the_default_path(sd_pipeline(), dataset, copy)
            except (IndexIntegrityError, ValueError, FileNotFoundError) as error:
                assert str(error)
                continue
            if not (kind == "delete" and name in ARTEFACT_FILES):  # a missing fitted file is refitted from the rows
                undetected.append((name, kind, offset))
    assert trials >= 70 and not undetected, undetected


def test_editing_the_config_is_detected(built, tmp_path):
    pipe, dataset, source = built
    dm.AttributionIndex.from_pretrained(source).save_pretrained(tmp_path / "copy")
    path = tmp_path / "copy" / "dmin_config.json"
    text = path.read_text()
    assert '"seed": 0' in text
    path.write_text(text.replace('"seed": 0', '"seed": 7'))  # same size, another noise and sketch
    with pytest.raises(IndexIntegrityError, match="dmin_config.json does not match its checksum"):
        pipe.load_attribution_index(tmp_path / "copy")


def test_nan_rows_and_queries_are_refused(built, tmp_path, monkeypatch):
    pipe, dataset, source = built
    index = pipe.load_attribution_index(source, dataset=dataset)
    with pytest.raises(ValueError, match="NaN or infinite"):
        index.search(torch.full((index.config.row_dim,), float("nan")), top_k=2)
    from dmin_diffusers.store import VectorStoreWriter

    writer = VectorStoreWriter(tmp_path / "store", row_dim=4, dtype="float16")
    with pytest.raises(ValueError, match="row 3 has a NaN or infinite DMin vector"):
        writer.add(3, torch.tensor([1.0, float("inf"), 0.0, 0.0]))


@pytest.mark.parametrize("component", ["text_encoder", "vae", "tokenizer", "vae_scaling"])
def test_other_input_models_are_refused(built, component):
    pipe, dataset, directory = built
    other = sd_pipeline()
    if component == "text_encoder":
        other.text_encoder = tiny_pipeline("stable-diffusion", seed=5).text_encoder
    elif component == "vae":
        other.vae = tiny_pipeline("stable-diffusion", seed=5).vae
    elif component == "tokenizer":
        other.tokenizer.add_tokens(["<sks>"])
    else:
        other.vae.register_to_config(scaling_factor=0.5)
    with pytest.raises(ValueError, match="input models: the VAE, text encoder"):
        other.load_attribution_index(directory)
    with pytest.warns(UserWarning, match="input models"):
        other.load_attribution_index(directory, strict=False)


def test_rows_belong_to_one_dataset(built, tmp_path):
    pipe, dataset, directory = built
    shuffled = dataset.shuffle(seed=3)
    with pytest.raises(ValueError, match="not the one .* was built on: its rows differ"):
        pipe.load_attribution_index(directory, dataset=shuffled)
    with pytest.warns(UserWarning, match="its rows differ"):
        index = pipe.load_attribution_index(directory, dataset=shuffled, strict=False)
    assert index.dataset is shuffled

    other = make_caption_dataset(NUM_ROWS, seed=1)
    assert len(other) == len(dataset)
    before = {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="another dataset .*content_digest"):
        pipe.build_attribution_index(other, directory, config=config(), progress=False)  # would "resume"
    assert {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()} == before


def test_save_pretrained_never_clobbers_another_index(built, tmp_path):
    pipe, dataset, directory = built
    index = dm.AttributionIndex.from_pretrained(directory)
    other = sd_pipeline().build_attribution_index(
        make_caption_dataset(4, seed=2), tmp_path / "other", config=config(), progress=False
    )
    assert other.num_rows == 4
    before = {p: p.read_bytes() for p in (tmp_path / "other").rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match="already holds another attribution index; pass overwrite=True"):
        index.save_pretrained(tmp_path / "other")
    assert {p: p.read_bytes() for p in (tmp_path / "other").rglob("*") if p.is_file()} == before
    index.save_pretrained(tmp_path / "other", overwrite=True)
    copied = dm.AttributionIndex.from_pretrained(tmp_path / "other", verify=True)
    assert copied.num_rows == NUM_ROWS and copied.manifest["shards"] == index.manifest["shards"]
    index.save_pretrained(tmp_path / "other")  # saving the same index again is allowed


@contextlib.contextmanager
def lock_held_by_another_process(directory, leftover=None):
    """Another process holds ``directory``'s write lock (having written ``leftover`` there, if given)."""
    write = f"(Path({str(directory)!r}) / {leftover!r}).write_text('{{}}')" if leftover else "pass"
    script = textwrap.dedent(f"""
        from pathlib import Path
        import time
        from dmin_diffusers.locks import index_write_lock
        with index_write_lock({str(directory)!r}):
            {write}
            print("locked", flush=True)
            time.sleep(60)
    """)
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.kill()
        holder.wait()


def test_a_held_lock_refuses_a_second_writer(built, tmp_path):
    pipe, dataset, directory = built
    index = dm.AttributionIndex.from_pretrained(directory)
    with lock_held_by_another_process(tmp_path / "busy"):
        with pytest.raises(IndexBusyError, match="another process is writing"):
            index.save_pretrained(tmp_path / "busy")
        with pytest.raises(IndexBusyError, match="another process is writing"):
            pipe.build_attribution_index(dataset, tmp_path / "busy", config=config(), progress=False)
    with index_write_lock(tmp_path / "busy"):  # free again once the holder is gone
        pass


BUILD = """
import sys
import dmin_diffusers as dm
from tiny_models import make_caption_dataset, tiny_pipeline
seed = int(sys.argv[1])
pipe = tiny_pipeline("stable-diffusion", dm.DMinStableDiffusionPipeline, lora_rank=4)
config = dm.DMinConfig(num_timesteps=2, projection_dim=256, shard_size=1)
pipe.build_attribution_index(make_caption_dataset(6, seed=seed), sys.argv[2], config=config, progress=False)
print("built", seed)
"""


@pytest.mark.slow
def test_two_processes_with_different_datasets_in_one_directory(tmp_path):
    """One build wins; the other is refused with a message (busy, or another dataset); the index is intact."""
    directory = tmp_path / "index"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parent))  # for tiny_models
    builds = [subprocess.Popen([sys.executable, "-c", BUILD, str(seed), str(directory)], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE) for seed in (0, 1)]
    outcomes = [(build.wait(timeout=600), *build.communicate()) for build in builds]
    winners = [seed for seed, (code, _, _) in zip((0, 1), outcomes) if code == 0]
    assert len(winners) == 1, outcomes
    loser_error = outcomes[1 - winners[0]][2]
    assert "another process is writing" in loser_error or "another dataset" in loser_error, loser_error[-2000:]
    dataset = make_caption_dataset(NUM_ROWS, seed=winners[0])
    use_on_the_default_path(sd_pipeline(), dataset, directory)
    index = dm.AttributionIndex.from_pretrained(directory, verify=True)
    assert index.num_rows == NUM_ROWS and sorted(index.store.row_ids.tolist()) == list(range(NUM_ROWS))


# ---------------------------------------------------------------------------------------------- zero vectors


def test_zero_rows_are_refused_when_written_and_when_read(tmp_path, monkeypatch):
    from dmin_diffusers import store as store_module
    from dmin_diffusers.store import VectorStore, VectorStoreWriter, merge_manifests

    writer = VectorStoreWriter(tmp_path / "refused", row_dim=8, dtype="float32", block_size=4)
    with pytest.raises(ValueError, match="row 5 has an all-zero DMin vector at timestep 1: the tracked parameters"):
        writer.add(5, torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="row 6 has an all-zero DMin vector: .*LoRA scale of 0"):
        VectorStoreWriter(tmp_path / "whole", row_dim=8, dtype="float32").add(6, torch.zeros(8))

    monkeypatch.setattr(store_module, "_zero_block", lambda vector, block_size: None)  # an older writer
    writer = VectorStoreWriter(tmp_path / "stored", row_dim=8, dtype="float16", shard_size=2)
    writer.add(0, torch.ones(8))
    writer.add(1, torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0]))
    writer.flush()
    merge_manifests(tmp_path / "stored")
    store = VectorStore(tmp_path / "stored", block_size=4)
    assert store.get_rows([0]).sum() == 8
    with pytest.raises(IndexIntegrityError, match="row 1 in .* is all zeros for a timestep"):
        store.get_rows([1])
    with pytest.raises(IndexIntegrityError, match="row 1 in .* is all zeros for a timestep"):
        list(VectorStore(tmp_path / "stored", block_size=4).iter_chunks())


def test_an_index_built_with_the_lora_scale_at_zero_fails_loudly(tmp_path):
    pipe = sd_pipeline()
    pipe.set_adapters(list(pipe.unet.peft_config), adapter_weights=[0.0])
    with pytest.raises(ValueError, match="row 0 has an all-zero DMin vector.*LoRA scale of 0"):
        pipe.build_attribution_index(make_caption_dataset(2), tmp_path / "index", config=config(), progress=False)


# ---------------------------------------------------------------------------------------------- two writers


def test_a_writer_holding_the_lock_is_reported_busy_before_its_files_are_judged(built, tmp_path):
    """The winner of a race has written its dataset reference but not yet its config: the loser must hear that
    another process is writing, not that the directory is foreign."""
    from dmin_diffusers.build_directory import check_not_foreign, prepare_index_directory

    pipe, dataset, _ = built
    busy = tmp_path / "busy"
    with lock_held_by_another_process(busy, leftover="dataset.json"):
        with pytest.raises(IndexBusyError, match="another process is writing"):
            check_not_foreign(busy)
        with pytest.raises(IndexBusyError, match="another process is writing"):
            prepare_index_directory(busy, config(), {"num_rows": NUM_ROWS})
        with pytest.raises(IndexBusyError, match="another process is writing"):
            pipe.build_attribution_index(dataset, busy, config=config(), progress=False)
    with pytest.raises(ValueError, match="is not empty and is not an attribution index"):
        check_not_foreign(busy)  # the holder is gone: now its leftovers are judged


# ---------------------------------------------------------------------------------------------- stale index


def test_replace_stale_deletes_only_an_index_built_otherwise(built, tmp_path, caplog):
    from dmin_diffusers.build_directory import prepare_index_directory

    pipe, dataset, source = built
    directory = tmp_path / "rerun"
    dm.AttributionIndex.from_pretrained(source).save_pretrained(directory)
    other = config(seed=3)
    with pytest.raises(ValueError, match="already holds an index built with other settings"):
        prepare_index_directory(directory, other, {"num_rows": NUM_ROWS})
    info = dm.AttributionIndex.from_pretrained(directory).dataset_info
    with caplog.at_level("WARNING"):
        prepare_index_directory(directory, other, info, replace_stale=True)
    assert "stale attribution index" in caplog.text and "seed" in caplog.text
    assert sorted(p.name for p in directory.iterdir()) == [".dmin.lock", "dataset.json", "dmin_config.json", "vectors"]
    assert list((directory / "vectors").iterdir()) == []
    assert dm.DMinConfig.from_json_file(directory / "dmin_config.json").seed == 3

    (directory / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds files that are not part of an attribution index .*notes.txt"):
        prepare_index_directory(directory, config(), info, replace_stale=True)
    assert (directory / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------- bounded reads


def test_files_that_are_not_regular_or_too_large_are_refused_without_blocking(built, tmp_path):
    _, _, source = built
    index = dm.AttributionIndex.from_pretrained(source)
    cases = {}
    for kind in ("fifo", "device", "directory", "huge"):
        copy = tmp_path / kind
        index.save_pretrained(copy)
        cases[kind] = copy
    os.unlink(cases["fifo"] / "dmin_config.json")
    os.mkfifo(cases["fifo"] / "dmin_config.json")  # open() for reading would wait for a writer forever
    os.unlink(cases["device"] / "manifest.json")
    os.symlink("/dev/zero", cases["device"] / "manifest.json")  # endless bytes
    os.unlink(cases["directory"] / "dataset.json")
    os.mkdir(cases["directory"] / "dataset.json")
    with open(cases["huge"] / "manifest.json", "r+b") as handle:
        handle.truncate(65 << 20)  # sparse: larger than any manifest this library writes
    messages = {"fifo": "dmin_config.json in .* is not a regular file",
                "device": "manifest.json in .* is not a regular",
                "directory": "dataset.json .*(not a regular file|is listed in manifest.json but missing)",
                "huge": "manifest.json in .* has more than"}
    for kind, copy in cases.items():
        with pytest.raises(IndexIntegrityError, match=messages[kind]):
            dm.AttributionIndex.from_pretrained(copy)


def test_an_hnsw_file_the_manifest_does_not_list_is_never_loaded(built, tmp_path, caplog):
    pipe, dataset, source = built
    index = dm.AttributionIndex.from_pretrained(source)
    other = tmp_path / "other"
    sd_pipeline().build_attribution_index(make_caption_dataset(NUM_ROWS, seed=4), other, config=config(),
                                          progress=False)
    copy = tmp_path / "copy"
    index.save_pretrained(copy)
    from dmin_diffusers.store import read_manifest, write_manifest

    manifest = read_manifest(copy)
    for name in KNN_FILES:  # unlisted, and replaced by another index's valid HNSW files over the same row ids
        del manifest["files"][name]
        (copy / name).write_bytes((other / name).read_bytes())
    write_manifest(copy, manifest)
    opened = dm.AttributionIndex.from_pretrained(copy)
    assert "knn.bin" not in opened.files()
    query = pipe.attribution_vector(dataset[2]["image"], dataset[2]["text"])
    with caplog.at_level("WARNING"):
        assert opened.search(query, 3) == index.search(query, 3)
    assert "no knn.bin" in caplog.text


def test_a_read_only_index_loads_and_attributes_without_writing_anything(built, tmp_path):
    pipe, dataset, source = built
    index = dm.AttributionIndex.from_pretrained(source)
    shared = tmp_path / "shared"
    index.save_pretrained(shared)
    for name in KNN_FILES:
        (shared / name).unlink()  # a missing HNSW index is rebuilt in memory only
    from dmin_diffusers.store import record_files

    record_files(shared, list(KNN_FILES))
    (shared / ".dmin.lock").unlink()

    def snapshot():
        return {p.relative_to(shared).as_posix(): (p.stat().st_mtime_ns, p.read_bytes()) for p in shared.rglob("*")
                if p.is_file()}

    for path in [*shared.rglob("*"), shared]:
        path.chmod(path.stat().st_mode & ~0o222)
    try:
        before = snapshot()
        use_on_the_default_path(sd_pipeline(), dataset, shared)
        assert snapshot() == before and not (shared / ".dmin.lock").exists()
    finally:
        for path in [shared, *shared.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)


def test_files_are_written_with_the_users_umask(built, tmp_path):
    _, _, source = built
    previous = os.umask(0o022)
    try:
        dm.AttributionIndex.from_pretrained(source).save_pretrained(tmp_path / "copy")
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "copy").rglob("*")}
    assert all(mode & 0o044 == 0o044 for mode in modes.values()), modes  # others can read a shared copy
