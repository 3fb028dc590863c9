"""Fixtures shared by the test modules; plain helper functions are in tests/helpers.py."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Small networks gain nothing from threads, and on a busy 2-core machine OpenMP's spinning makes them slow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

