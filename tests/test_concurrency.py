"""Concurrent use of one pipeline (the page's users, a server's threads): every answer equals the one a call gives
alone, and the pipeline is unchanged afterwards."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import dmin_diffusers as dm
from dmin_diffusers.app import explain
from tiny_models import make_caption_dataset, tiny_pipeline

NUM_ROWS = 6
THREADS = 4


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    pipe = tiny_pipeline("stable-diffusion", dm.DMinStableDiffusionPipeline, lora_rank=4)
    dataset = make_caption_dataset(NUM_ROWS)
    pipe.build_attribution_index(dataset, tmp_path_factory.mktemp("threads") / "index",
                                 config=dm.DMinConfig(num_timesteps=2, projection_dim=256), progress=False)
    return pipe, dataset


def calls(dataset, rounds=1):
    """(row, exact) for every row, exact and HNSW, ``rounds`` times."""
    return [(row, exact) for _ in range(rounds) for row in range(NUM_ROWS) for exact in (False, True)]


def attribute(pipe, dataset, row, exact):
    result = pipe.attribute(dataset[row]["image"], dataset[row]["text"], top_k=3, exact=exact)
    return result.indices, result.scores


def parameters_of(pipe):
    return {name: (type(p), p.requires_grad, p.grad, p.detach().clone()) for name, p in pipe.unet.named_parameters()}


def test_threads_get_the_sequential_answers_and_leave_the_pipeline_unchanged(built):
    pipe, dataset = built
    before = parameters_of(pipe)
    work = calls(dataset)
    sequential = [attribute(pipe, dataset, row, exact) for row, exact in work]
    with ThreadPoolExecutor(THREADS) as pool:
        concurrent = list(pool.map(lambda call: attribute(pipe, dataset, *call), work))
    for (row, _), (indices, scores), (expected_indices, expected_scores) in zip(work, concurrent, sequential):
        assert indices == expected_indices and indices[0] == row
        np.testing.assert_allclose(scores, expected_scores, rtol=1e-6, atol=1e-6)
    after = parameters_of(pipe)
    assert after.keys() == before.keys()
    for name, (kind, requires_grad, grad, values) in before.items():
        assert after[name][0] is kind is torch.nn.Parameter, name
        assert after[name][1] == requires_grad and after[name][2] is None and grad is None, name
        assert torch.equal(after[name][3], values), name
    assert attribute(pipe, dataset, 0, False) == sequential[0]


def test_generation_and_attribution_in_threads_do_not_disturb_each_other(built):
    pipe, dataset = built

    def generate(seed):
        generator = torch.Generator().manual_seed(seed)
        return pipe("a red circle", num_inference_steps=2, height=32, width=32, generator=generator,
                    output_type="np").images[0]

    alone = [generate(seed) for seed in range(3)]
    answers = [attribute(pipe, dataset, row, False) for row in range(3)]
    with ThreadPoolExecutor(THREADS) as pool:
        images = [pool.submit(generate, seed) for seed in range(3)]
        ranked = [pool.submit(attribute, pipe, dataset, row, False) for row in range(3)]
        for future, expected in zip(images, alone):
            np.testing.assert_array_equal(future.result(), expected)
        assert [future.result() for future in ranked] == answers


def test_the_page_serves_concurrent_users(built):
    pipe, dataset = built
    alone = [explain(pipe, dataset[row]["image"], dataset[row]["text"], top_k=3).result.indices
             for row in range(NUM_ROWS)]
    with ThreadPoolExecutor(THREADS) as pool:
        pages = list(pool.map(lambda row: explain(pipe, dataset[row]["image"], dataset[row]["text"], top_k=3),
                              list(range(NUM_ROWS)) * 2))
    assert [page.result.indices for page in pages] == alone * 2
