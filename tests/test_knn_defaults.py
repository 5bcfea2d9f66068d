"""Issue 11: the HNSW index holds 64 principal components per timestep, and its candidates are re-ranked."""

import json

import pytest
import torch

import dmin_diffusers as dm
from dmin_diffusers.config import CONFIG_NAME, DEFAULT_KNN_DIM
from dmin_diffusers.knn_projection import KNN_PROJECTION_NAME, fit_projection, load_projection, save_projection
from dmin_diffusers.search import OVERSAMPLING
from dmin_diffusers.store import IndexIntegrityError
from tiny_models import make_caption_dataset, tiny_pipeline

NUM_ROWS = 8
T, K = 3, 4096  # the real default K: the HNSW memory target is for it
DEFAULTS = dm.DMinConfig(num_timesteps=T, projection_dim=K)


@pytest.fixture(scope="module")
def pipe_and_dataset():
    pipe = tiny_pipeline("stable-diffusion", dm.DMinStableDiffusionPipeline, lora_rank=4)
    return pipe, make_caption_dataset(NUM_ROWS)


def test_the_default_index_is_small_and_agrees_with_exact_search(pipe_and_dataset, tmp_path):
    pipe, dataset = pipe_and_dataset
    index = pipe.build_attribution_index(dataset, tmp_path / "index", config=DEFAULTS, progress=False)
    assert (index.config.knn_dim, index.config.knn_projection) == (DEFAULT_KNN_DIM, "pca")
    saved = json.loads((tmp_path / "index" / CONFIG_NAME).read_text())
    assert (saved["knn_dim"], saved["knn_projection"]) == (DEFAULT_KNN_DIM, "pca")
    stored_row_bytes = T * K * 2  # float16
    assert (tmp_path / "index" / "knn.bin").stat().st_size / NUM_ROWS <= stored_row_bytes / 4
    assert KNN_PROJECTION_NAME in index.manifest["files"]
    for row in range(NUM_ROWS):  # re-ranked on the full rows: the same rows and scores as exact search
        approximate = pipe.attribute(dataset[row]["image"], dataset[row]["text"], top_k=3)
        exact = pipe.attribute(dataset[row]["image"], dataset[row]["text"], top_k=3, exact=True)
        assert approximate.indices == exact.indices and approximate.indices[0] == row
        torch.testing.assert_close(torch.tensor(approximate.scores), torch.tensor(exact.scores))
    reopened = dm.AttributionIndex.from_pretrained(tmp_path / "index")
    torch.testing.assert_close(reopened.knn.projection, index.knn.projection)
    index.save_pretrained(tmp_path / "copy")
    assert (tmp_path / "copy" / KNN_PROJECTION_NAME).is_file()


def test_a_damaged_projection_is_refused(pipe_and_dataset, tmp_path):
    pipe, dataset = pipe_and_dataset
    pipe.build_attribution_index(dataset, tmp_path / "index", config=DEFAULTS, progress=False)
    path = tmp_path / "index" / KNN_PROJECTION_NAME
    save_projection(torch.zeros(T, K, DEFAULT_KNN_DIM), path)  # another projection: its checksum differs
    with pytest.raises(IndexIntegrityError, match=KNN_PROJECTION_NAME):
        dm.AttributionIndex.from_pretrained(tmp_path / "index").knn
    save_projection(torch.zeros(T, K, 8), path)
    with pytest.raises(ValueError, match="expected one float32 'projection' of shape"):
        load_projection(path, T, K, DEFAULT_KNN_DIM)
    save_projection(torch.full((T, K, DEFAULT_KNN_DIM), float("nan")), path)
    with pytest.raises(ValueError, match="NaN"):
        load_projection(path, T, K, DEFAULT_KNN_DIM)


def test_the_projection_keeps_the_leading_components():
    generator = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(64, 4, generator=generator)).Q  # rows live in a 4-dimensional subspace
    sample = (torch.randn(50, 2, 4, generator=generator) @ basis.T)
    projection = fit_projection(sample, 4, seed=0)
    assert projection.shape == (2, 64, 4)
    for t in range(2):  # the projection spans the same subspace: inner products are kept exactly
        projected = sample[:, t] @ projection[t]
        torch.testing.assert_close(projected @ projected.T, sample[:, t] @ sample[:, t].T, rtol=1e-4, atol=1e-4)
    assert torch.equal(fit_projection(sample, 4, seed=0), projection)  # seeded
    few = fit_projection(sample[:3], 8, seed=0)  # fewer rows than components: zero columns
    assert few.shape == (2, 64, 8) and not few[:, :, 3:].any()


def test_candidates_are_oversampled_unless_the_vectors_are_the_rows(monkeypatch, pipe_and_dataset, tmp_path):
    pipe, dataset = pipe_and_dataset
    asked = []
    for name, fields in (("pca", {}), ("full", {"knn_dim": K, "knn_projection": "fold"})):
        config = dm.DMinConfig(num_timesteps=T, projection_dim=K, **fields)
        index = pipe.build_attribution_index(dataset, tmp_path / name, config=config, progress=False)
        candidates = index.knn.candidates
        monkeypatch.setattr(index.knn, "candidates",  # ``mapped=``: the query in a preconditioner's geometry
                            lambda q, count, **kw: asked.append(count) or candidates(q, count, **kw))
        pipe.attribute(dataset[0]["image"], dataset[0]["text"], top_k=1)
    assert asked == [OVERSAMPLING, 1]


def test_an_index_from_before_the_projection_keeps_folded_vectors():
    old = dm.DMinConfig(num_timesteps=T, projection_dim=K).to_dict()
    old.update(format_version=2, knn_dim=None)
    del old["knn_projection"]
    config = dm.DMinConfig.from_dict(old)
    assert (config.knn_dim, config.knn_projection) == (K, "fold")  # format 2: no knn_dim meant the full K
    old["knn_dim"] = 64
    assert dm.DMinConfig.from_dict(old).knn_dim == 64
