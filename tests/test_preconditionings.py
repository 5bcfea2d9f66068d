"""Preconditionings are registered recipe parts: one registration makes a new combination a valid, fitted and
described option, scoring as defined."""

import argparse

import numpy as np
import pytest

import dmin_diffusers as dm
from dmin_diffusers import preconditionings
from dmin_diffusers.preconditioner import Preconditioner
from dmin_diffusers.setting_arguments import add_setting_arguments
from test_preconditioner import dense_scores, unit_rows


@pytest.fixture
def kernel_cosine(monkeypatch):
    """TRAK's kernel with rows normalised in its geometry, registered for one test."""
    monkeypatch.setattr(preconditionings, "_REGISTRY", dict(preconditionings._REGISTRY))
    return preconditionings.register_preconditioning(
        "kernel-cosine", kernel=True, normalise_rows=True, description="the kernel cosine (λ = {damping:g} s₁)")


def test_a_registered_preconditioning_is_a_valid_option_and_scores_as_defined(kernel_cosine):
    assert dm.DMinConfig(preconditioning="kernel-cosine").preconditioning == "kernel-cosine"
    parser = argparse.ArgumentParser()
    add_setting_arguments(parser, names=["preconditioning"])
    assert parser.parse_args(["--preconditioning", "kernel-cosine"]).dmin_preconditioning == "kernel-cosine"
    rows, queries = unit_rows(40, 3, 16, seed=0), unit_rows(5, 3, 16, seed=1)
    fitted = Preconditioner.fit(rows, "kernel-cosine", 0.05)
    expected = dense_scores("kernel", rows, queries, 0.05, normalize_rows=True)
    np.testing.assert_allclose(fitted.scores(queries, rows).double().numpy(), expected, rtol=1e-4, atol=1e-4)


def test_names_are_checked_against_the_registry():
    with pytest.raises(ValueError, match="preconditioning must be one of"):
        dm.DMinConfig(preconditioning="whitened")
    with pytest.raises(ValueError, match="already registered"):
        preconditionings.register_preconditioning("kernel", kernel=True, description="again")
    assert preconditionings.preconditioning_named("none").is_identity
    assert not preconditionings.preconditioning_named("centered").is_identity
