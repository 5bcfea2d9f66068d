import os

# Tests never reach the network; set before huggingface_hub is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest_plugins = ["hub_server"]  # the local_hub fixture: a fake Hub on 127.0.0.1

# The models are tiny: one thread is faster than two, and far faster when another process holds a core.
torch.set_num_threads(1)


@pytest.fixture
def tmp_index_dir(tmp_path):
    return tmp_path / "index"


@pytest.fixture(autouse=True)
def _code_cache_in_tmp(tmp_path_factory, monkeypatch):
    """The compressor's on-disk code cache never touches the real home directory."""
    monkeypatch.setenv("DMIN_DIFFUSERS_CACHE", str(tmp_path_factory.getbasetemp() / "dmin-cache"))
