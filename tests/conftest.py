import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")
# Tiny models: one thread avoids oversubscription (much faster for small ops on a 2-core machine).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seed 0, and one intra-op thread: on tiny tensors a second thread only adds OpenMP synchronisation,
    which on a loaded 2-core machine makes each op ~100x slower (measured). Restored after each test
    (runs may set their own thread count)."""
    torch.manual_seed(0)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True, scope="session")
def _private_input_cache(tmp_path_factory):
    """Folder-data tests cache their images in a session folder, not in the user's cache."""
    old = os.environ.get("PYRA_INPUT_CACHE")
    os.environ["PYRA_INPUT_CACHE"] = str(tmp_path_factory.mktemp("input_cache"))
    yield
    if old is None:
        os.environ.pop("PYRA_INPUT_CACHE", None)
    else:
        os.environ["PYRA_INPUT_CACHE"] = old


@pytest.fixture(autouse=True)
def _restore_logging():
    """An in-process Hydra app points the root logger at the test's captured stdout; put the handlers back
    afterwards, so a later test never logs into a closed stream."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)



@pytest.fixture
def umask():
    """Set the process umask (022 to start with; call the fixture's value to change it); restored after."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)
