"""Attribution indices on the Hub, against the local fake Hub of hub_server.py: push, load, revisions, integrity,
belonging, sharded uploads, the dataset card and training rows loaded from a Hub dataset."""

from pathlib import Path

import datasets
import pytest
import torch
from huggingface_hub import (
    DatasetCard,
    HfApi,
    create_repo,
    hf_hub_download,
    list_repo_files,
    repo_info,
    upload_file,
    upload_folder,
)

import dmin_diffusers as dm
from dmin_diffusers.dataset_rows import HubDatasetRows
from dmin_diffusers.families import detect_family
from dmin_diffusers.build_directory import describe_dataset
from dmin_diffusers.resolution import check_config_matches
from dmin_diffusers.store import IndexIntegrityError
from tiny_models import make_caption_dataset, make_image_dataset, tiny_pipeline

REPO = "user/sd-lora-shapes-dmin"
DATASET_REPO = "user/shapes"
NUM_ROWS = 10


def shard_names(index):
    """The index's 3 shard files, in row order (their names hold a digest of their content)."""
    names = [shard["file"] for shard in index.manifest["shards"]]
    assert len(names) == 3 and all(name.startswith("vectors/part-000-of-001-") for name in names)
    return names


def make_pipeline(**kwargs):
    return tiny_pipeline("stable-diffusion", pipeline_class=dm.DMinStableDiffusionPipeline, lora_rank=4, **kwargs)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """An index of 10 rows in 3 shards, recording that its rows are the Hub dataset ``user/shapes``."""
    pipe, dataset = make_pipeline(), make_caption_dataset(NUM_ROWS)
    directory = tmp_path_factory.mktemp("built") / "index"
    config = dm.DMinConfig(num_timesteps=4, projection_dim=1024, shard_size=4, base_model="user/tiny-sd")
    index = pipe.build_attribution_index(
        dataset, directory, config=config, progress=False,
        dataset_reference={"name": DATASET_REPO, "split": "train"},
    )
    return pipe, dataset, index


def upload_dataset(dataset, tmp_path, repo_id=DATASET_REPO):
    folder = tmp_path / f"dataset-{len(list(tmp_path.iterdir()))}"
    (folder / "data").mkdir(parents=True)
    dataset.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    create_repo(repo_id, repo_type="dataset", exist_ok=True)
    return upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=folder).oid


def attribute_both(pipe, dataset, rows=(2, 7)):
    return [
        (result.indices, result.scores)
        for row in rows
        for exact in (True, False)
        for result in [pipe.attribute(dataset[row]["image"], dataset[row]["text"], top_k=4, exact=exact)]
    ]


def copy_of(index, directory):
    index.save_pretrained(directory)
    return dm.AttributionIndex.from_pretrained(directory)


def test_push_then_load_in_a_fresh_cache_attributes_like_the_local_index(local_hub, built, tmp_path):
    pipe, dataset, index = built
    commit = index.push_to_hub(REPO, private=True)
    info = repo_info(REPO, repo_type="dataset")
    assert info.private and info.sha == commit.oid
    assert sorted(list_repo_files(REPO, repo_type="dataset")) == sorted(
        [".gitattributes", "README.md", "dataset.json", "dmin_config.json", "knn.bin", "knn_projection.safetensors",
         "manifest.json", *(["preconditioner.safetensors"] if index.config.preconditioning != "none" else []),
         *shard_names(index)]
    )  # no per-writer part-*.json lists, no temporary files

    card = DatasetCard.load(hf_hub_download(REPO, "README.md", repo_type="dataset"))
    metadata = card.data.to_dict()
    assert {"dmin", "data-attribution"} <= set(metadata["tags"]) and metadata["viewer"] is False
    assert metadata["source_datasets"] == [DATASET_REPO] and metadata["base_model"] == "user/tiny-sd"
    assert metadata["dmin"]["rows"] == NUM_ROWS and metadata["dmin"]["timesteps"] == [125, 375, 625, 875]
    assert f'pipe.load_attribution_index("{REPO}")' in card.text and "user/tiny-sd" in card.text

    upload_dataset(dataset, tmp_path)
    other = make_pipeline()  # the same weights, built anew
    cache = local_hub.new_cache_dir()
    loaded = other.load_attribution_index(REPO, cache_dir=cache)
    assert Path(loaded.directory).is_relative_to(cache) and loaded.read_only
    assert attribute_both(other, dataset) == attribute_both(pipe, dataset)
    result = other.attribute(dataset[5]["image"], dataset[5]["text"], top_k=3)
    assert result.examples_unavailable_reason is None
    assert [row["text"] for row in result.examples] == [dataset[i]["text"] for i in result.indices]

    local_hub.clear_requests()
    offline = dm.AttributionIndex.from_pretrained(REPO, cache_dir=cache, local_files_only=True)
    assert offline.num_rows == NUM_ROWS and local_hub.requests == []
    assert index.push_to_hub(REPO).oid == commit.oid  # nothing changed: no new commit


def test_revisions_branches_and_an_index_without_its_knn_file(local_hub, built, tmp_path):
    pipe, dataset, index = built
    first = index.push_to_hub(REPO)
    without_knn = copy_of(index, tmp_path / "no-knn")
    (without_knn.directory / "knn.bin").unlink()
    second = without_knn.push_to_hub(REPO, commit_message="drop the HNSW file")
    assert "knn.bin" in list_repo_files(REPO, repo_type="dataset", revision=first.oid)
    assert "knn.bin" not in list_repo_files(REPO, repo_type="dataset")  # stale files go in the last commit

    old = dm.AttributionIndex.from_pretrained(REPO, revision=first.oid, cache_dir=local_hub.new_cache_dir())
    new = dm.AttributionIndex.from_pretrained(REPO, revision="main", cache_dir=local_hub.new_cache_dir())
    assert (old.directory / "knn.bin").is_file() and not (new.directory / "knn.bin").exists()
    assert second.oid in new.source
    query = pipe.attribution_vector(dataset[4]["image"], dataset[4]["text"])
    assert new.search(query, 4, exact=True) == old.search(query, 4, exact=True) == index.search(query, 4, exact=True)
    assert not (new.directory / "knn.bin").exists()  # exact search never needs the HNSW file
    assert new.search(query, 4) == index.search(query, 4)  # rebuilt in memory: the cache stays untouched
    assert not (new.directory / "knn.bin").exists()
    new.save_pretrained(tmp_path / "rebuilt")
    rebuilt = dm.AttributionIndex.from_pretrained(tmp_path / "rebuilt", verify=True)
    assert rebuilt.search(query, 4) == index.search(query, 4)

    from dmin_diffusers.cli import main  # `dmin push`: AttributionIndex.from_pretrained(path).push_to_hub(...)

    assert main(["push", "--index", str(index.directory), "--repo_id", REPO, "--revision", "dev"]) == 0
    branches = {b.name for b in HfApi().list_repo_refs(REPO, repo_type="dataset").branches}
    assert branches == {"main", "dev"}
    assert "knn.bin" in list_repo_files(REPO, repo_type="dataset", revision="dev")
    assert repo_info(REPO, repo_type="dataset").sha == second.oid

    in_model_repo = index.push_to_hub("user/tiny-lora", repo_type="model", subfolder="dmin-index")
    assert "dmin-index/README.md" in list_repo_files("user/tiny-lora") and "README.md" not in list_repo_files(
        "user/tiny-lora"
    )
    beside_lora = dm.AttributionIndex.from_pretrained("user/tiny-lora", repo_type="model", subfolder="dmin-index")
    assert in_model_repo.oid in beside_lora.source and beside_lora.search(query, 4) == index.search(query, 4)


def test_tampered_or_truncated_files_are_named(local_hub, built, tmp_path):
    pipe, dataset, index = built
    SHARDS = shard_names(index)
    index.push_to_hub(REPO)
    shard = bytearray(Path(index.directory, SHARDS[1]).read_bytes())
    shard[-7] ^= 0xFF  # same size, one vector value changed
    upload_file(path_or_fileobj=bytes(shard), path_in_repo=SHARDS[1], repo_id=REPO, repo_type="dataset")
    with pytest.raises(IndexIntegrityError, match=f"{SHARDS[1]} does not match its checksum in manifest.json"):
        dm.AttributionIndex.from_pretrained(REPO, cache_dir=local_hub.new_cache_dir())

    with pytest.raises(FileNotFoundError, match="'no-such-index' is not a local directory"):
        dm.AttributionIndex.from_pretrained("no-such-index")

    truncated = copy_of(index, tmp_path / "truncated").directory
    with open(truncated / SHARDS[2], "r+b") as handle:
        handle.truncate(1000)
    with pytest.raises(IndexIntegrityError, match=f"{SHARDS[2]} has 1000 bytes but manifest.json lists .* truncated"):
        dm.AttributionIndex.from_pretrained(truncated)

    # knn.bin with a plausible header of another index (M changed): refused before hnswlib reads it
    damaged = copy_of(index, tmp_path / "damaged")
    knn = bytearray((damaged.directory / "knn.bin").read_bytes())
    knn[72:80] = (16).to_bytes(8, "little")  # the header field M
    (damaged.directory / "knn.bin").write_bytes(bytes(knn))
    opened = dm.AttributionIndex.from_pretrained(damaged.directory)  # size unchanged: hashed when first loaded
    query = pipe.attribution_vector(dataset[1]["image"], dataset[1]["text"])
    assert opened.search(query, 3, exact=True) == index.search(query, 3, exact=True)
    with pytest.raises(IndexIntegrityError, match="knn.bin does not match its checksum"):
        opened.search(query, 3)
    with pytest.raises(IndexIntegrityError, match="knn.bin does not match its checksum"):
        dm.AttributionIndex.from_pretrained(damaged.directory, verify=True)
    (damaged.directory / "knn.bin").unlink()
    opened.build_knn()  # rebuilt and re-listed in the manifest
    repaired = dm.AttributionIndex.from_pretrained(damaged.directory, verify=True)
    assert repaired.search(query, 3) == index.search(query, 3)


def test_an_index_is_refused_by_a_pipeline_it_does_not_belong_to(local_hub, built):
    pipe, dataset, index = built
    index.push_to_hub(REPO)
    other_adapter = make_pipeline()
    with torch.no_grad():
        for name, parameter in other_adapter.unet.named_parameters():
            if "lora_B" in name:
                parameter.mul_(1.5)
    local_hub.clear_requests()
    with pytest.raises(ValueError, match=rf"{REPO}@\w+ does not belong.*tracked parameter values: 32 of 64 differ"):
        other_adapter.load_attribution_index(REPO, cache_dir=local_hub.new_cache_dir())
    assert not any("vectors/" in path for _, path in local_hub.requests)  # refused before the download
    with pytest.warns(UserWarning, match="does not belong.*tracked parameter values"):
        other_adapter.load_attribution_index(REPO, strict=False)
    assert len(other_adapter.attribute(dataset[0]["image"], dataset[0]["text"], top_k=2).indices) == 2

    other_base = make_pipeline()
    with torch.no_grad():
        other_base.unet.conv_in.weight.add_(0.01)
    with pytest.raises(ValueError, match="denoiser: its architecture or base weights"):
        other_base.load_attribution_index(REPO)

    other_schedule = make_pipeline()
    other_schedule.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, beta_end=0.02)
    with pytest.raises(ValueError, match="objective: the training noise schedule"):
        other_schedule.load_attribution_index(index)

    half = make_pipeline().to(torch.float16)  # the value digest is over float16 values: same weights match
    assert check_config_matches(index.config, detect_family(half)) == []


def test_a_large_index_is_pushed_in_several_commits_and_resumes(local_hub, built, monkeypatch):
    _, _, index = built
    SHARDS = shard_names(index)
    create_commit = HfApi.create_commit
    calls = []

    def interrupted(self, *args, **kwargs):
        calls.append(kwargs["commit_message"])
        if len(calls) == 2:
            raise ConnectionError("connection lost")
        return create_commit(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(HfApi, "create_commit", interrupted)
        with pytest.raises(ConnectionError):  # shards of 33, 33 and 17 kB: one commit each, then the metadata
            index.push_to_hub(REPO, max_commit_bytes=40_000)
    partial = list_repo_files(REPO, repo_type="dataset")
    assert SHARDS[0] in partial and "manifest.json" not in partial  # an interrupted push shows no index yet

    final = index.push_to_hub(REPO, max_commit_bytes=40_000)  # resumes: the first shard is not sent again
    commits = HfApi().list_repo_commits(REPO, repo_type="dataset")
    assert [c.title for c in commits] == [
        "Upload DMin attribution index",
        "Upload DMin attribution index (vectors, part 2 of 2)",
        "Upload DMin attribution index (vectors, part 1 of 2)",
        "Upload DMin attribution index (vectors, part 1 of 3)",
        commits[-1].title,  # the repository's initial commit
    ]
    assert commits[0].commit_id == final.oid
    assert index.push_to_hub(REPO, max_commit_bytes=40_000).oid == final.oid  # complete: nothing to send
    loaded = dm.AttributionIndex.from_pretrained(REPO, cache_dir=local_hub.new_cache_dir())
    assert loaded.store.get_rows(list(range(NUM_ROWS))).equal(index.store.get_rows(list(range(NUM_ROWS))))


def test_an_interrupted_push_over_an_index_leaves_the_previous_one_intact(local_hub, built, tmp_path, monkeypatch):
    """Shard names hold a digest of their content: the new index's shards never overwrite the old one's, so until
    the metadata commit ``main`` is the previous index, complete and verified."""
    pipe, _, first = built
    config = dm.DMinConfig(num_timesteps=4, projection_dim=1024, shard_size=4, base_model="user/tiny-sd")
    second = pipe.build_attribution_index(make_caption_dataset(NUM_ROWS, seed=1), tmp_path / "second",
                                          config=config, progress=False)
    assert not set(shard_names(first)) & set(shard_names(second))
    first.push_to_hub(REPO)
    create_commit = HfApi.create_commit
    calls = []

    def interrupted(self, *args, **kwargs):
        calls.append(kwargs["commit_message"])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return create_commit(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(HfApi, "create_commit", interrupted)
        with pytest.raises(KeyboardInterrupt):
            second.push_to_hub(REPO, max_commit_bytes=40_000)
    assert [title.split("(")[-1] for title in calls[:2]] == ["vectors, part 1 of 3)", "vectors, part 2 of 3)"]
    rows = list(range(NUM_ROWS))
    on_main = dm.AttributionIndex.from_pretrained(REPO, cache_dir=local_hub.new_cache_dir())  # verified: a Hub copy
    assert on_main.manifest["shards"] == first.manifest["shards"]
    assert torch.equal(on_main.store.get_rows(rows), first.store.get_rows(rows))

    second.push_to_hub(REPO, max_commit_bytes=40_000)  # resumes: the 2 shards already there are not sent again
    on_main = dm.AttributionIndex.from_pretrained(REPO, cache_dir=local_hub.new_cache_dir())
    assert on_main.manifest["shards"] == second.manifest["shards"]
    assert torch.equal(on_main.store.get_rows(rows), second.store.get_rows(rows))
    assert not set(shard_names(first)) & set(list_repo_files(REPO, repo_type="dataset"))  # deleted in the last commit


def test_training_rows_come_from_the_recorded_hub_revision(local_hub, tmp_path):
    dataset = make_caption_dataset(6)
    first = upload_dataset(dataset, tmp_path)
    upload_dataset(dataset.select([5, 4, 3, 2, 1, 0]), tmp_path)  # main changes afterwards
    loaded = datasets.load_dataset(DATASET_REPO, split="train", revision=first)
    info = describe_dataset(loaded, "image", "text")
    assert (info["name"], info["revision"], info["split"]) == (DATASET_REPO, first, "train")
    rows = HubDatasetRows(info)
    assert rows.unavailable_reason is None and rows[1]["text"] == dataset[1]["text"]

    selected = HubDatasetRows(info | {"selection": "shuffle(seed=3).select(range(4))", "num_rows": 4})
    assert selected[0]["text"] == dataset.shuffle(seed=3)[0]["text"]
    missing = HubDatasetRows(info | {"name": "user/gone"})
    with pytest.raises(LookupError, match="could not load the training dataset 'user/gone'"):
        missing[0]
    assert "user/gone" in missing.unavailable_reason
    assert "not on the Hub" in HubDatasetRows({"num_rows": 6}).unavailable_reason
    assert "built on 7" in HubDatasetRows(info | {"num_rows": 7}).unavailable_reason


# ---------------------------------------------------------------------------------------------- every family


@pytest.mark.parametrize("kind", ["ddpm", "stable-diffusion", "sdxl", "sd3", "flux"])
def test_every_family_round_trips_through_the_hub(local_hub, kind, tmp_path):
    """save_pretrained(push_to_hub=True), then a fresh pipeline loads the index from the Hub and ranks as before."""
    pipeline_class = {family.name: family.ready_made for family in dm.registered_families()}
    pipe = tiny_pipeline(kind, pipeline_class=pipeline_class[kind], lora_rank=None if kind == "ddpm" else 4)
    data = make_image_dataset(5) if kind == "ddpm" else make_caption_dataset(5)
    config = dm.DMinConfig(num_timesteps=2, projection_dim=256, resolution=32 if kind == "flux" else None)
    index = pipe.build_attribution_index(data, tmp_path / "built", config=config, progress=False)
    commit = index.save_pretrained(tmp_path / "copy", push_to_hub=True, repo_id=f"user/{kind}-index", private=True)
    assert repo_info(f"user/{kind}-index", repo_type="dataset").sha == commit.oid

    fresh = tiny_pipeline(kind, pipeline_class=pipeline_class[kind], lora_rank=None if kind == "ddpm" else 4)
    fresh.load_attribution_index(f"user/{kind}-index", dataset=data, cache_dir=local_hub.new_cache_dir())
    assert fresh.attribution_index.config == index.config
    prompts = None if kind == "ddpm" else [row["text"] for row in data]
    for exact in (True, False):
        results = fresh.attribute([row["image"] for row in data], prompts, top_k=2, exact=exact)
        assert [result.indices[0] for result in results] == list(range(5))
        before = pipe.attribute([row["image"] for row in data], prompts, top_k=2, exact=exact)
        assert [r.indices for r in results] == [r.indices for r in before]


def test_push_to_hub_takes_keywords_as_huggingface_hub_does(local_hub, built):
    _, _, index = built
    with pytest.raises(TypeError):
        index.push_to_hub(REPO, True)  # private must be named, as in ModelHubMixin.push_to_hub
    commit = index.push_to_hub(REPO, branch="dev", commit_message="to a branch")
    assert "knn.bin" in list_repo_files(REPO, repo_type="dataset", revision="dev")
    pr = index.push_to_hub(REPO, create_pr=True)
    assert pr.pr_url is not None and commit.oid
