"""Issue 18: rows belong to their dataset by content (not by file path), every entry point drops a dataset's
transform, images opened from a path are oriented as `datasets` orients them, and the build's lock and log."""

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest
import torch

import dmin_diffusers as dm
from dmin_diffusers.fingerprints import _sampled_digest, check_dataset_digest, dataset_digest
from dmin_diffusers.index import CHECKSUMMED_FILES
from dmin_diffusers.inputs import open_image
from dmin_diffusers.locks import IndexBusyError
from dmin_diffusers.store import record_files
from dmin_diffusers.training_data import load_training_dataset
from tiny_models import make_caption_dataset, tiny_pipeline

NUM_ROWS = 6
COLUMNS = ["image", "text"]


def small_config():
    return dm.DMinConfig(num_timesteps=2, projection_dim=256, shard_size=2)


def write_imagefolder(folder: Path, num_rows: int = NUM_ROWS) -> Path:
    """An imagefolder as diffusers' scripts read with --train_data_dir: PNG files and a metadata.jsonl."""
    folder.mkdir(parents=True)
    rows = make_caption_dataset(num_rows)
    with open(folder / "metadata.jsonl", "w") as handle:
        for number, row in enumerate(rows):
            row["image"].save(folder / f"{number:04d}.png")
            handle.write(json.dumps({"file_name": f"{number:04d}.png", "text": row["text"]}) + "\n")
    return folder


def swap_files(first: Path, second: Path) -> None:
    temporary = first.with_suffix(".swap")
    first.rename(temporary)
    second.rename(first)
    temporary.rename(second)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The training imagefolder, and a byte-identical copy of it in another folder (as after a move)."""
    root = tmp_path_factory.mktemp("data")
    original = write_imagefolder(root / "original")
    shutil.copytree(original, root / "moved")
    return original, root / "moved"


@pytest.fixture(scope="module")
def built(folders, tmp_path_factory):
    """A pipeline and an index built on the original folder."""
    pipe = tiny_pipeline("stable-diffusion", dm.DMinStableDiffusionPipeline, lora_rank=4)
    directory = tmp_path_factory.mktemp("index") / "index"
    pipe.build_attribution_index(load_training_dataset(train_data_dir=str(folders[0])), directory,
                                 config=small_config(), progress=False)
    return pipe, directory


# ------------------------------------------------------------------------------------- the digest itself


def test_the_digest_follows_image_content_not_paths(folders, tmp_path):
    original = load_training_dataset(train_data_dir=str(folders[0]))
    recorded = dataset_digest(original, COLUMNS)
    assert original.with_format("arrow")[0:1].column("image").to_pylist()[0]["bytes"] is None  # read from the files
    moved = load_training_dataset(train_data_dir=str(folders[1]))
    assert dataset_digest(moved, COLUMNS) == recorded  # a copy elsewhere (other paths) is the same dataset
    assert check_dataset_digest(moved, COLUMNS, recorded) is None
    files = [Path(cell["path"]) for cell in moved.cast_column("image", datasets.Image(decode=False))["image"]]
    embedded = datasets.Dataset.from_dict(  # the same files' bytes stored in the table (as a Hub dataset holds them)
        {"image": [{"path": None, "bytes": file.read_bytes()} for file in files], "text": moved["text"]},
        features=moved.features,
    )
    assert dataset_digest(embedded, COLUMNS) == recorded

    edited = write_imagefolder(tmp_path / "edited")
    dataset = load_training_dataset(train_data_dir=str(edited))
    assert dataset_digest(dataset, COLUMNS) == recorded
    image = PIL.Image.open(edited / "0003.png").convert("RGB")
    image.putpixel((5, 5), (0, 0, 0) if image.getpixel((5, 5)) != (0, 0, 0) else (255, 255, 255))
    image.save(edited / "0003.png")  # one pixel of one image replaced on disk, behind the loaded dataset
    assert "its rows differ" in check_dataset_digest(dataset, COLUMNS, recorded)

    swapped = write_imagefolder(tmp_path / "swapped")
    dataset = load_training_dataset(train_data_dir=str(swapped))
    swap_files(swapped / "0001.png", swapped / "0004.png")  # each caption now sits beside another image
    assert "its rows differ" in check_dataset_digest(dataset, COLUMNS, recorded)


def test_the_digest_covers_order_captions_and_stored_bytes(folders):
    rows = make_caption_dataset(NUM_ROWS)  # images stored as PNG bytes in the Arrow table
    recorded = dataset_digest(rows, COLUMNS)
    assert recorded.startswith("rows-sha256:") and recorded == dataset_digest(make_caption_dataset(NUM_ROWS), COLUMNS)
    assert check_dataset_digest(rows, COLUMNS, recorded) is None
    assert "in another order" in check_dataset_digest(rows.select([0, 2, 1, 3, 4, 5]), COLUMNS, recorded)
    recaptioned = rows.map(lambda row, number: {"text": row["text"] + ("!" if number == 5 else "")},
                           with_indices=True)
    assert check_dataset_digest(recaptioned, COLUMNS, recorded) is not None
    assert check_dataset_digest(make_caption_dataset(NUM_ROWS, seed=1), COLUMNS, recorded) is not None
    assert check_dataset_digest(rows, ["image"], dataset_digest(rows, ["image"])) is None
    assert check_dataset_digest(rows.remove_columns("text"), COLUMNS, recorded) == "it has no column ['text']"
    # a transform does not change the rows: the digest reads them raw
    flipped = rows.with_transform(lambda batch: {"image": [PIL.ImageOps.mirror(i) for i in batch["image"]],
                                                 "text": batch["text"]})
    assert check_dataset_digest(flipped, COLUMNS, recorded) is None


def test_a_long_dataset_is_read_in_batches(monkeypatch):
    import dmin_diffusers.fingerprints as fingerprints

    rows = make_caption_dataset(NUM_ROWS, size=8)
    whole = dataset_digest(rows, COLUMNS)
    monkeypatch.setattr(fingerprints, "_BATCH_ROWS", 4)  # two batches, the second one short
    assert dataset_digest(rows, COLUMNS) == whole
    assert dataset_digest(rows.select([5, 4, 3, 2, 1, 0]), COLUMNS) != whole


# ------------------------------------------------------------------------------------- attach_dataset


def test_attach_accepts_a_moved_copy_and_refuses_edits(built, folders, tmp_path):
    pipe, directory = built
    assert dm.AttributionIndex.from_pretrained(directory).dataset_info["content_digest"].startswith("rows-sha256:")
    moved = load_training_dataset(train_data_dir=str(folders[1]))
    index = pipe.load_attribution_index(directory, dataset=moved)  # old code: refused (other paths)
    assert index.dataset is moved

    swapped_folder = tmp_path / "swapped"
    shutil.copytree(folders[0], swapped_folder)
    swapped = load_training_dataset(train_data_dir=str(swapped_folder))
    swap_files(swapped_folder / "0000.png", swapped_folder / "0002.png")  # old code: accepted (same paths)
    with pytest.raises(ValueError, match=r"not the one .* was built on: its rows differ \(an image or caption"):
        pipe.load_attribution_index(directory, dataset=swapped)
    with pytest.warns(UserWarning, match="its rows differ"):
        index = dm.AttributionIndex.from_pretrained(directory)
        index.attach_dataset(swapped, strict=False)
    assert index.dataset is swapped
    with pytest.raises(ValueError, match="its rows differ"):
        pipe.load_attribution_index(directory, dataset=moved.shuffle(seed=1))


def test_an_index_with_the_old_sampled_digest_still_attaches_its_dataset(built, folders, tmp_path):
    """Indices built before recorded 16 hex digits of a 16-row sample: they are compared the old way."""
    pipe, directory = built
    old = tmp_path / "old"
    shutil.copytree(directory, old)
    dataset = load_training_dataset(train_data_dir=str(folders[0]))
    info = json.loads((old / "dataset.json").read_text())
    info["content_digest"] = _sampled_digest(dataset, COLUMNS)
    assert re.fullmatch(r"[0-9a-f]{16}", info["content_digest"])
    (old / "dataset.json").write_text(json.dumps(info))
    record_files(old, list(CHECKSUMMED_FILES))  # as the old version wrote it: checksummed
    assert pipe.load_attribution_index(old, dataset=dataset).dataset is dataset
    with pytest.raises(ValueError, match="its rows differ"):
        pipe.load_attribution_index(old, dataset=dataset.shuffle(seed=1))


# ---------------------------------------------------------------------- transforms, orientation, lock, log


def test_build_attribution_index_drops_a_transform_and_says_so(built, folders, tmp_path, caplog):
    pipe, directory = built
    dataset = load_training_dataset(train_data_dir=str(folders[0]))

    def mirror(batch):  # an augmentation that always flips: a kept transform would change every row's vector
        flip = lambda image: PIL.ImageOps.mirror(image) if isinstance(image, PIL.Image.Image) else image  # noqa: E731
        return {"image": [flip(image) for image in batch["image"]], "text": batch["text"]}

    with caplog.at_level(logging.WARNING, logger="dmin_diffusers.caching"):
        index = pipe.build_attribution_index(dataset.with_transform(mirror), tmp_path / "index",
                                             config=small_config(), progress=False)
    assert any("drops the dataset's 'custom' format" in record.getMessage() for record in caplog.records)
    reference = dm.AttributionIndex.from_pretrained(directory)
    rows = list(range(NUM_ROWS))
    assert torch.equal(index.store.get_rows(rows), reference.store.get_rows(rows))  # same process and pipeline
    assert np.array_equal(np.asarray(index.dataset[0]["image"]), np.asarray(dataset[0]["image"]))  # raw rows


def test_open_image_orients_as_datasets_does(tmp_path):
    array = np.zeros((24, 40, 3), dtype=np.uint8)  # 40 wide, 24 high, a marked corner
    array[:4, :6] = (255, 0, 0)
    path = tmp_path / "photo.png"
    exif = PIL.Image.Exif()
    exif[PIL.Image.ExifTags.Base.Orientation] = 6  # a camera held on its side: shown rotated by 90 degrees
    PIL.Image.fromarray(array).save(path, exif=exif)

    decoded = datasets.Dataset.from_dict({"image": [str(path)]}).cast_column("image", datasets.Image())[0]["image"]
    opened = open_image(path)
    assert PIL.Image.open(path).size == (40, 24) and opened.size == decoded.size == (24, 40)
    assert np.array_equal(np.asarray(opened), np.asarray(decoded))
    plain = tmp_path / "plain.png"
    PIL.Image.fromarray(array).save(plain)
    assert np.array_equal(np.asarray(open_image(plain)), array)


HOLD_LOCK = """
import sys, time
from pathlib import Path
from dmin_diffusers.locks import index_write_lock
with index_write_lock(sys.argv[1]):
    (Path(sys.argv[1]) / "dataset.json").write_text("{}")  # a build that has written its first file only
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_directory_being_written_is_reported_busy_not_foreign(built, folders, tmp_path):
    """The loser of two builds racing into one directory is told that another process is writing (the lock is
    taken before the directory is looked at), not that the winner's half-written files are a foreign folder."""
    pipe, _ = built
    directory = tmp_path / "racing"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(directory)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(IndexBusyError, match="another process is writing"):  # old code: "not an attribution index"
            pipe.build_attribution_index(make_caption_dataset(NUM_ROWS), directory, config=small_config(),
                                         progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert sorted(path.name for path in directory.iterdir()) == [".dmin.lock", "dataset.json"]


def test_the_log_counts_every_file_of_the_index(built, tmp_path, caplog):
    pipe, _ = built
    with caplog.at_level(logging.INFO, logger="dmin_diffusers.caching"):
        index = pipe.build_attribution_index(make_caption_dataset(NUM_ROWS), tmp_path / "index",
                                             config=small_config(), progress=False)
    logged = [m for m in (r.getMessage() for r in caplog.records) if "MB on disk" in m]
    assert len(logged) == 1
    total = sum((index.directory / name).stat().st_size for name in index.files())
    assert "knn_projection.safetensors" in index.files() and total > index.nbytes + 20_000
    assert f", {total / 1e6:.2f} MB on disk)" in logged[0]  # old code: the vector shards alone
