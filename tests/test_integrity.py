"""An index never returns a wrong ranking without an error: damaged files, edited configs, other input models,
another dataset, and concurrent writers are all refused with a message that names the problem."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import dmin_diffusers as dm
from dmin_diffusers.locks import IndexBusyError, index_write_lock
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
    assert {"dmin_config.json", "dataset.json", "manifest.json", *KNN_FILES} <= set(names) and len(names) == 8
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
            if not (kind == "delete" and name in KNN_FILES):  # a missing HNSW file is rebuilt from the rows
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


def test_a_held_lock_refuses_a_second_writer(built, tmp_path):
    pipe, dataset, directory = built
    index = dm.AttributionIndex.from_pretrained(directory)
    script = textwrap.dedent(f"""
        import time
        from dmin_diffusers.locks import index_write_lock
        with index_write_lock({str(tmp_path / 'busy')!r}):
            print("locked", flush=True)
            time.sleep(60)
    """)
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(IndexBusyError, match="another process is writing"):
            index.save_pretrained(tmp_path / "busy")
        with pytest.raises(IndexBusyError, match="another process is writing"):
            pipe.build_attribution_index(dataset, tmp_path / "busy", config=config(), progress=False)
    finally:
        holder.kill()
        holder.wait()
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
