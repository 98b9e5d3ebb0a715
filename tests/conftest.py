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
