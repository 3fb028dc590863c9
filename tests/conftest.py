import json
import os
import pydoc

import pytest
import torch

REFERENCE = os.path.join(os.path.dirname(__file__), "reference")


def load_manifest(name: str) -> dict:
    """A reference manifest of the original implementation (see tests/reference/README.md)."""
    with open(os.path.join(REFERENCE, f"{name}.json")) as f:
        return json.load(f)


def manifest_kwargs(manifest: dict) -> dict:
    """The manifest's constructor config with class paths resolved, as nnU-Net resolves plans."""
    config = dict(manifest["config"])
    for key in ("conv_op", "norm_op", "dropout_op", "nonlin"):
        if isinstance(config.get(key), str):
            config[key] = pydoc.locate(config[key])
    return config


@pytest.fixture
def manifest():
    return load_manifest


@pytest.fixture(scope="module")
def one_thread():
    """Small networks gain nothing from threads, and on a busy 2-core machine OpenMP's spinning makes them slow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
