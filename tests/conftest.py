"""Test configuration shared by the whole suite.

* 8 simulated CPU devices (``XLA_FLAGS``), set before anything imports jax, so sharding code runs as on a pod.
* Strict dtype promotion: a float32 array never silently meets a float64 one (library bugs surface here).
* ``x64`` fixture: run one test with float64 enabled (``jax.enable_x64`` context manager, jax >= 0.10).
* Compiled programs are released whenever the process holds many memory mappings. Every XLA:CPU executable holds
  ~3 mappings until it is freed; the whole suite compiles ~20,000 programs (one module alone ~10,000), and a
  process that keeps them all passes Linux's ``vm.max_map_count`` (65,530): the next compile then dies with a
  segmentation fault or abort inside XLA (seen in CI).
"""
import gc
import os

# Append rather than overwrite: keep any XLA flags the user already set.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402  (must come after XLA_FLAGS)
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")


_MAPS = "/proc/self/maps"
_MAX_MAPPINGS = 16384  # a quarter of Linux's default vm.max_map_count


@pytest.fixture(autouse=True)
def _release_compiled_programs():
    """After a test, free the cached executables (and their mappings) once the process holds too many."""
    yield
    if os.path.exists(_MAPS):
        with open(_MAPS) as f:
            if sum(1 for _ in f) > _MAX_MAPPINGS:
                jax.clear_caches()
                gc.collect()


@pytest.fixture
def x64():
    """Enable float64 for the duration of one test."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def rng():
    """A seeded numpy generator, fresh for each test."""
    import numpy as np

    return np.random.default_rng(0)
