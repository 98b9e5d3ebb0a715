"""Test set-up: 8 fake CPU devices (so sharding is tested on one CPU) and the shared data path.

XLA_FLAGS must be set before JAX first touches a device, hence at import of this file.
"""

import os
import tempfile
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent compilation cache for the whole session (subprocesses inherit it): the tests
# run the same tiny programs many times, and compiling dominates their time on a CPU.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="rlhf_jax_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import pytest  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every file it writes at INFO

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


# The files that take longest (measured with --durations), started first so that the parallel
# workers finish together instead of one running the quickstart alone at the end.
SLOWEST_FIRST = ("test_quickstart.py", "test_train_loop.py", "test_fast_paths.py", "test_sweep.py",
                 "test_alignment_tax.py", "test_pipeline_real_data.py", "test_reruns.py", "test_dpo_stage.py",
                 "test_benchmarks_memory.py", "test_pipeline_algorithms.py")


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: a worker per core, at most 4 (each holds its own JAX runtime and models)."""
    return max(1, min(len(os.sched_getaffinity(0)), 4))


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ../shared/data; skips the test when the folder is absent (a user's fresh clone)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent: this test reads the project's shared real data")
    return SHARED_DATA


@pytest.fixture(scope="session")
def mesh():
    """A mesh of one of the fake devices, for tests that load and run a model unsharded."""
    import jax

    from rlhf_jax import sharding

    return sharding.make_mesh(devices=jax.devices()[:1])
