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


#: The longest tests (each starts interpreters or trains several runs), started first: with two xdist
#: workers, a long test left to the end keeps one worker busy while the other idles.
LONG_TESTS = (
    "test_gpu_check.py::test_gpu_check_quick_runs_every_step",
    "test_train.py::test_ddp_run_evaluates_every_test_image_exactly_once",
    "test_lifecycle.py::test_a_run_stopped_and_killed_mid_stage_resumes_at_its_last_epoch",
    "test_sweeps.py::test_the_local_launcher_runs_one_job_per_gpu_slot",
    "test_embedded.py::test_demo_pretraining_caches_a_pretrained_backbone",
    "test_optuna.py::test_two_optuna_trials_on_the_demo_report_the_best_setting",
    "test_sweeps.py::test_a_sweep_reports_exact_ids_exits_non_zero_on_a_failure_and_launches_a_run_once",
    "test_plugin.py::test_a_plugin_trained_in_a_multirun_gets_a_table_row_and_a_paired_row",
    "test_packaging.py::test_installed_demo",
    "test_backbone_config.py::test_dinov2_config_trains_one_epoch_and_writes_a_record",
)


def pytest_collection_modifyitems(session, config, items):
    """Modules with a long test first, that test first in its module; a stable sort (the rest keep their
    order, the same on every xdist worker) that keeps each module together, so module-scoped fixtures (the
    wheel build, the lifecycle reference run) are set up once per worker."""
    rank = {name: i for i, name in enumerate(LONG_TESTS)}
    module_rank: dict[str, int] = {}
    for name, i in rank.items():
        module_rank.setdefault(name.split("::")[0], i)

    def key(item):
        name = item.nodeid.split("/")[-1]
        return module_rank.get(name.split("::")[0], len(LONG_TESTS)), rank.get(name, len(LONG_TESTS))

    items.sort(key=key)
