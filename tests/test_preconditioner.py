"""Preconditioned scores: each option scores as defined (against a dense numpy computation), fitting streams the
store, an index switches option without a gradient, the file round-trips and is refused when damaged or foreign,
and an index written before preconditioning existed scores exactly as before."""

import json
import shutil

import numpy as np
import pytest
import torch

import dmin_diffusers as dm
from dmin_diffusers.config import PRECONDITIONINGS
from dmin_diffusers.gradients import GradientSketcher
from dmin_diffusers.preconditioner import PRECONDITIONER_NAME, Preconditioner
from dmin_diffusers.store import IndexIntegrityError, record_files
from tiny_models import make_image_dataset, tiny_pipeline

NUM_ROWS = 12
METHODS = [m for m in PRECONDITIONINGS if m != "none"]


def unit_rows(count, T, K, seed, common_weight=3.0):
    """Unit rows sharing one large common direction per timestep, like DMin's."""
    generator = torch.Generator().manual_seed(seed)
    common = torch.randn(1, T, K, generator=generator) * common_weight
    rows = torch.randn(count, T, K, generator=generator) + common
    return rows / rows.norm(dim=2, keepdim=True)


def dense_scores(method, rows, queries, damping, normalize_rows=None):
    """The definition, in float64 numpy: per timestep, (q - cμ)ᵀ P (g - cμ) / ‖q - cμ‖_P (/ ‖g - cμ‖_P)."""
    normalize = method == "centered" if normalize_rows is None else normalize_rows
    total = np.zeros((len(queries), len(rows)))
    for t in range(rows.shape[1]):
        G, Q = rows[:, t].double().numpy(), queries[:, t].double().numpy()
        if method == "none":
            total += Q @ G.T
            continue
        mean = G.mean(0) if method.startswith("centered") else np.zeros(G.shape[1])
        Gc, Qc = G - mean, Q - mean
        P = np.eye(G.shape[1])
        if method.endswith("kernel"):
            C = Gc.T @ Gc / len(G)
            P = np.linalg.inv(C + damping * np.linalg.eigvalsh(C).max() * np.eye(G.shape[1]))
        scores = Qc @ P @ Gc.T / np.sqrt(np.einsum("qk,kl,ql->q", Qc, P, Qc))[:, None]
        if normalize:
            scores /= np.sqrt(np.einsum("nk,kl,nl->n", Gc, P, Gc))[None]
        total += scores
    return total


@pytest.mark.parametrize(("method", "normalize_rows"), [(m, None) for m in PRECONDITIONINGS] + [
    ("kernel", True), ("centered-kernel", True), ("centered", False)])
def test_each_option_scores_as_defined(method, normalize_rows):
    rows, queries = unit_rows(40, 3, 16, seed=0), unit_rows(5, 3, 16, seed=1)
    fitted = Preconditioner.fit(rows, method, 0.05, normalize_rows=normalize_rows)
    expected = dense_scores(method, rows, queries, 0.05, normalize_rows)
    np.testing.assert_allclose(fitted.scores(queries, rows).double().numpy(), expected, rtol=1e-4, atol=1e-4)
    # the HNSW geometry: mapped queries and rows give the same scores as inner products
    mapped = torch.einsum("qtk,ntk->qn", torch.stack([fitted.map_query(q) for q in queries]),
                          fitted.map_rows(rows, torch.arange(len(rows))))
    np.testing.assert_allclose(mapped.double().numpy(), expected, rtol=1e-4, atol=1e-4)
    scorer = fitted.row_scorer(queries[0])
    np.testing.assert_allclose(scorer(torch.arange(len(rows)), rows.reshape(len(rows), -1)).double().numpy(),
                               expected[0], rtol=1e-4, atol=1e-4)


def test_options_change_the_ranking_and_centring_alone_does_not_shift_it():
    rows, queries = unit_rows(40, 3, 16, seed=0), unit_rows(5, 3, 16, seed=1)
    plain = Preconditioner.identity(3, 16).scores(queries, rows)
    for method in METHODS:
        scores = Preconditioner.fit(rows, method, 0.01).scores(queries, rows)
        assert not torch.equal(scores.argsort(dim=1), plain.argsort(dim=1)), method


def test_fewer_rows_than_values_is_exact_and_more_uses_the_low_rank_form():
    """With N <= rank the kept eigenpairs span the rows: exact. With N > rank the rest of the spectrum is replaced
    by its mean; the randomised fit then matches that form computed densely."""
    rows, queries = unit_rows(20, 2, 64, seed=2), unit_rows(3, 2, 64, seed=3)
    fitted = Preconditioner.fit(rows, "centered-kernel", 0.01, rank=24)
    np.testing.assert_allclose(fitted.scores(queries, rows).numpy(), dense_scores("centered-kernel", rows, queries,
                                                                                   0.01), rtol=1e-3, atol=1e-3)
    generator = torch.Generator().manual_seed(4)  # a decaying spectrum, as gradients have: top directions separate
    many = torch.randn(300, 2, 64, generator=generator) * 0.8 ** torch.arange(64.0) + 2 * torch.randn(1, 2, 64)
    many = many / many.norm(dim=2, keepdim=True)
    low = Preconditioner.fit(many, "kernel", 0.01, rank=8)
    for t in range(2):
        G = many[:, t].double().numpy()
        values, vectors = np.linalg.eigh(G.T @ G / len(G))
        values, vectors = values[::-1], vectors[:, ::-1]
        damping = 0.01 * values[0]
        kept = vectors[:, :8] @ np.diag(1 / (values[:8] + damping)) @ vectors[:, :8].T
        rest = 1 / (values[8:].mean() + damping) * (np.eye(64) - vectors[:, :8] @ vectors[:, :8].T)
        vector, _ = low.prepare_query(queries[0])
        q = queries[0, t].double().numpy()
        expected = (kept + rest) @ q
        expected /= np.sqrt(q @ (kept + rest) @ q)
        np.testing.assert_allclose(vector[t].double().numpy(), expected, rtol=2e-2, atol=2e-3)


def test_fitting_streams_chunks_like_one_tensor():
    rows = unit_rows(50, 2, 32, seed=5)

    def chunks():
        for start in range(0, 50, 7):  # uneven chunks, as a store's shards
            yield torch.arange(start, min(start + 7, 50)), rows[start:start + 7]

    for method in METHODS:
        whole, streamed = Preconditioner.fit(rows, method, 0.01), Preconditioner.fit(chunks, method, 0.01)
        torch.testing.assert_close(streamed.scores(rows[:4], rows), whole.scores(rows[:4], rows), rtol=1e-4,
                                   atol=1e-4)


def test_bad_settings_are_refused():
    rows = unit_rows(10, 2, 8, seed=0)
    with pytest.raises(ValueError, match="preconditioning must be one of"):
        Preconditioner.fit(rows, "whiten", 0.01)
    for damping in (0, -1, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="preconditioning_damping"):
            dm.DMinConfig(preconditioning="kernel", preconditioning_damping=damping)
    with pytest.raises(ValueError, match="without rows"):
        Preconditioner.fit(torch.zeros(0, 2, 8), "kernel", 0.01)


# ------------------------------------------------------------------------------------------ on an index


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    pipe = tiny_pipeline("ddpm", pipeline_class=dm.DMinDDPMPipeline)
    dataset = make_image_dataset(NUM_ROWS)
    directory = tmp_path_factory.mktemp("index") / "index"
    config = dm.DMinConfig(num_timesteps=3, projection_dim=256, shard_size=5, preconditioning="none")
    index = pipe.build_attribution_index(dataset, directory, config=config, progress=False)
    queries = torch.stack([pipe.attribution_vector(dataset[row]["image"]) for row in range(NUM_ROWS)])
    return pipe, dataset, index, queries


def copy_of(index, directory):
    index.save_pretrained(directory)
    return dm.AttributionIndex(directory)


def stored_rows(index):
    T, K = index.config.num_timesteps, index.config.projection_dim
    return index.store.get_rows(list(range(NUM_ROWS))).float().reshape(NUM_ROWS, T, K)


@pytest.mark.parametrize("method", METHODS)
def test_an_index_scores_every_path_alike_and_retrieves_itself(built, method, tmp_path):
    _, _, source, queries = built
    index = copy_of(source, tmp_path / "index")
    index.refit(method, 0.01)
    assert index.config.preconditioning == method and PRECONDITIONER_NAME in index.files()
    expected = dense_scores(method, stored_rows(index), queries, 0.01)
    for row, query in enumerate(queries):
        ids, scores = index.search(query, top_k=NUM_ROWS, exact=True)
        np.testing.assert_allclose(scores, expected[row][ids], rtol=1e-4, atol=1e-4)
        assert ids[0] == row and np.argmax(expected[row]) == row
        approximate_ids, approximate_scores = index.search(query, top_k=3)
        assert approximate_ids == ids[:3]
        np.testing.assert_allclose(approximate_scores, scores[:3], rtol=1e-5, atol=1e-5)
        per_timestep = index.timestep_scores(query, ids[:3])
        np.testing.assert_allclose(per_timestep.sum(axis=1), scores[:3], rtol=1e-4, atol=1e-4)


def test_switching_needs_no_gradient_and_is_saved_checked_and_undone(built, tmp_path, monkeypatch):
    pipe, dataset, source, queries = built
    index = copy_of(source, tmp_path / "index")
    plain = index.search(queries[0], top_k=5, exact=True)
    monkeypatch.setattr(GradientSketcher, "sketch_many", lambda *a, **k: pytest.fail("a gradient was computed"))
    monkeypatch.setattr(GradientSketcher, "sketch", lambda *a, **k: pytest.fail("a gradient was computed"))
    index.refit("centered-kernel", 0.1)
    reopened = dm.AttributionIndex(tmp_path / "index", verify=True)  # config, file and checksums on disk
    assert (reopened.config.preconditioning, reopened.config.preconditioning_damping) == ("centered-kernel", 0.1)
    (ids, scores), (memory_ids, memory_scores) = (i.search(queries[0], top_k=5, exact=True) for i in (reopened, index))
    assert ids == memory_ids
    np.testing.assert_allclose(scores, memory_scores, rtol=1e-5, atol=1e-4)
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert PRECONDITIONER_NAME in manifest["files"]
    index.refit("none")
    assert not (tmp_path / "index" / PRECONDITIONER_NAME).exists()
    assert dm.AttributionIndex(tmp_path / "index").search(queries[0], top_k=5, exact=True) == plain


def test_a_read_only_index_refits_in_memory_and_saves_the_new_files(built, tmp_path):
    _, _, source, queries = built
    directory = tmp_path / "ro"
    source.save_pretrained(directory)
    readonly = dm.AttributionIndex(directory, read_only=True)
    readonly.refit("kernel", 0.01)
    assert not (directory / PRECONDITIONER_NAME).exists()
    with pytest.raises(ValueError, match="save_pretrained it"):
        readonly.push_to_hub("user/x")
    saved = copy_of(readonly, tmp_path / "saved")
    assert saved.config.preconditioning == "kernel" and PRECONDITIONER_NAME in saved.files()
    (ids, scores), (memory_ids, memory_scores) = saved.search(queries[3], top_k=4), readonly.search(queries[3], top_k=4)
    assert ids == memory_ids
    np.testing.assert_allclose(scores, memory_scores, rtol=1e-5, atol=1e-4)  # a loaded copy's tensors are laid out anew


def test_the_preconditioner_round_trips_through_the_hub(built, local_hub, tmp_path):
    pipe, dataset, source, queries = built
    index = copy_of(source, tmp_path / "index")
    index.refit("centered-kernel", 0.01)
    index.push_to_hub("user/ddpm-preconditioned")
    loaded = dm.AttributionIndex.from_pretrained("user/ddpm-preconditioned", cache_dir=local_hub.new_cache_dir())
    assert loaded.config.preconditioning == "centered-kernel" and PRECONDITIONER_NAME in loaded.files()
    for query in queries[:3]:
        for exact in (False, True):
            (ids, scores), (local_ids, local_scores) = (i.search(query, top_k=4, exact=exact) for i in (loaded, index))
            assert ids == local_ids
            np.testing.assert_allclose(scores, local_scores, rtol=1e-5, atol=1e-4)


def test_a_damaged_or_foreign_preconditioner_is_refused(built, tmp_path):
    pipe, dataset, source, queries = built
    index = copy_of(source, tmp_path / "index")
    index.refit("centered", 0.01)
    path = tmp_path / "index" / PRECONDITIONER_NAME
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IndexIntegrityError, match="preconditioner.safetensors"):
        dm.AttributionIndex(tmp_path / "index").search(queries[0], top_k=3, exact=True)

    # another index's valid preconditioner (other rows), listed in this manifest as if it belonged here
    other_rows = make_image_dataset(NUM_ROWS, seed=7)
    other = pipe.build_attribution_index(other_rows, tmp_path / "other", config=source.config.unresolved()
                                         .replace(preconditioning="centered"), progress=False)
    shutil.copy(other.directory / PRECONDITIONER_NAME, path)
    record_files(tmp_path / "index", [PRECONDITIONER_NAME])
    with pytest.raises(IndexIntegrityError, match="rows_digest"):
        dm.AttributionIndex(tmp_path / "index").search(queries[0], top_k=3, exact=True)

    # a file for another option
    fitted = Preconditioner.fit(stored_rows(index), "kernel", 0.01)
    fitted.save(path)
    record_files(tmp_path / "index", [PRECONDITIONER_NAME])
    with pytest.raises(IndexIntegrityError, match="method"):
        dm.AttributionIndex(tmp_path / "index").search(queries[0], top_k=3, exact=True)


def test_an_index_from_before_preconditioning_scores_as_before(built, tmp_path):
    """A format-4 config (no preconditioning fields) loads as "none": scores are the plain inner products."""
    _, _, source, queries = built
    directory = tmp_path / "old"
    source.save_pretrained(directory)
    config = json.loads((directory / "dmin_config.json").read_text())
    for key in ("preconditioning", "preconditioning_damping"):
        config.pop(key)
    config["format_version"] = 4
    (directory / "dmin_config.json").write_text(json.dumps(config))
    record_files(directory, ["dmin_config.json"])
    old = dm.AttributionIndex(directory)
    assert old.config.preconditioning == "none" and PRECONDITIONER_NAME not in old.files()
    rows = stored_rows(old).reshape(NUM_ROWS, -1)
    for query in queries[:4]:
        ids, scores = old.search(query, top_k=NUM_ROWS, exact=True)
        plain = (rows @ query.reshape(-1)).numpy()
        np.testing.assert_allclose(scores, plain[ids], rtol=1e-6, atol=1e-6)
        assert ids == sorted(range(NUM_ROWS), key=lambda i: -plain[i])


def test_a_build_resumed_with_another_option_refits_instead_of_refusing(built, tmp_path):
    pipe, dataset, source, queries = built
    config = source.config.unresolved()
    pipe.build_attribution_index(dataset, tmp_path / "index", config=config, progress=False)
    again = pipe.build_attribution_index(dataset, tmp_path / "index", config=config.replace(
        preconditioning="kernel"), progress=False)
    assert again.config.preconditioning == "kernel"
    assert dm.AttributionIndex(tmp_path / "index").config.preconditioning == "kernel"
