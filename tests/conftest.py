"""Shared fixtures. The whole session runs torch on one intra-op thread: these tiny
convolutions run fastest that way (on a 2-core machine the suite took 11.5 min with torch's
default thread count, about 1 min with one), and the suite must not depend on
``OMP_NUM_THREADS`` being set. A test about threads sets them itself."""

import pyro
import pytest
import torch


def pytest_configure(config):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    """Each test starts with an empty param store and validation on."""
    pyro.clear_param_store()
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()


@pytest.fixture
def one_thread():
    """Tiny convolutions run fastest on one thread (and do not oversubscribe 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)
