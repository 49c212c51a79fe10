"""Test configuration shared by the whole suite.

* 8 simulated CPU devices (``XLA_FLAGS``), set before anything imports jax, so sharding code runs as on a pod.
* Strict dtype promotion: a float32 array never silently meets a float64 one (library bugs surface here).
* ``x64`` fixture: run one test with float64 enabled (``jax.enable_x64`` context manager, jax >= 0.10).
* Compiled programs are released whenever the process holds many memory mappings. Every XLA:CPU executable holds
  a few mappings until it is freed, and a process that keeps thousands of them passes Linux's
  ``vm.max_map_count`` (65,530): the next compile then dies with a segmentation fault or abort inside XLA (seen in
  CI when the suite compiled far more programs than it does now).
* ``DPMJAX_COMPILE_STATS=FILE``: count the XLA compilations and their time per test module (jax.monitoring
  events) and write them to FILE as JSON at the end (BENCHMARKS.md, "Test suite compilations").
"""
import gc
import os

# Append rather than overwrite: keep any XLA flags the user already set.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402  (must come after XLA_FLAGS)
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")

_COMPILE_STATS: dict = {}
_CURRENT_MODULE = ["<collection>"]


def _on_compile_event(name, duration, **_):
    stats = _COMPILE_STATS.setdefault(_CURRENT_MODULE[0], {"compiles": 0, "compile_s": 0.0, "trace_s": 0.0})
    if name == "/jax/core/compile/backend_compile_duration":
        stats["compiles"] += 1
        stats["compile_s"] += duration
    elif name == "/jax/core/compile/jaxpr_trace_duration":
        stats["trace_s"] += duration


if os.environ.get("DPMJAX_COMPILE_STATS"):
    jax.monitoring.register_event_duration_secs_listener(_on_compile_event)


def pytest_runtest_setup(item):
    _CURRENT_MODULE[0] = item.nodeid.split("::")[0]


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("DPMJAX_COMPILE_STATS")
    if path:
        import json

        total = {k: sum(s[k] for s in _COMPILE_STATS.values()) for k in ("compiles", "compile_s", "trace_s")}
        with open(path, "w") as f:
            json.dump({"total": total, "modules": _COMPILE_STATS}, f, indent=1)


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


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory):
    """The teacher of every method test, trained once per session: (workdir, dpmjax.methods.Teacher).

    A ~10k-parameter UNet trained 80 steps on 8x8 digits (``tiny_configs.teacher_config``): its samples are
    blurry digits, which is all mechanics tests need; quality effects are measured by ``experiments/``.
    """
    from tiny_configs import teacher_config

    from dpmjax.train.loop import train
    from dpmjax.workdir import load_teacher

    workdir = str(tmp_path_factory.mktemp("digits_teacher"))
    train(teacher_config(), workdir, num_devices=1, quiet=True)
    return workdir, load_teacher(workdir)
