"""``dpmjax.metrics.report``: the quality table behind the README (``dpmjax eval`` / ``quickstart``) and the
params-as-arguments sample generator.

The model is exact, not trained: the Gaussian mixture centred on the 1442 training digits (std 0.05) has an
exact eps (``dpmjax.oracle``), so its samples are real training digits up to small noise and must score at the
real-data floor; the same mixture on pixel-shuffled digits must score far above it. The digits classifier is
the real one (trained and cached on first use, ~25 s).
"""
import csv
import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dpmjax.data import get_dataset
from dpmjax.metrics import domain, report
from dpmjax.oracle import GaussianMixture
from dpmjax.schedules import schedule_from_config

SCHEDULE = schedule_from_config(dict(name="linear", num_train_timesteps=1000))  # the digits config's schedule
CONFIG = ml_collections.ConfigDict(dict(data=dict(name="digits", image_shape=(8, 8, 1))))


@pytest.fixture(scope="module")
def train_digits():
    return domain.all_images(get_dataset("digits", "train"))[0]


def _mixture(images):
    return GaussianMixture.create(images.reshape(len(images), -1), 0.05)


def _read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_quality_table_perfect_model_at_the_floor_shuffled_far_above(train_digits, tmp_path, capsys):
    perfect = _mixture(train_digits)
    out = tmp_path / "eval"
    rows, samples, floor = report.quality_table(perfect.model_fn(SCHEDULE), SCHEDULE, CONFIG, solvers=["dpmpp_2m"],
                                                nfes=[10], num=300, ddpm_steps=50, out_dir=str(out), progress=True)
    assert [(r["solver"], r["nfe"], r["num"]) for r in rows] == [
        ("real (train vs held-out)", 0, 355), ("dpmpp_2m", 10, 300), ("ddpm", 50, 300)]
    assert samples[("dpmpp_2m", 10)].shape == (300, 8, 8, 1) and floor["frechet"] == rows[0]["frechet"]
    real = rows[0]["frechet"]
    # measured: floor 12.4 (355 vs 355 images: small-sample bias), perfect model 6.9 (ODE) / 6.7 (DDPM)
    for row in rows[1:]:
        assert row["frechet"] < 1.5 * real and row["confident_share"] > 0.95
    assert "sampling dpmpp_2m nfe=10" in capsys.readouterr().err  # the tqdm bar

    shuffled = _mixture(np.stack([np.random.default_rng(i).permutation(im.reshape(-1)).reshape(im.shape)
                                  for i, im in enumerate(train_digits)]))
    bad_rows, _, _ = report.quality_table(shuffled.model_fn(SCHEDULE), SCHEDULE, CONFIG, solvers=["dpmpp_2m"],
                                          nfes=[10], num=300, ddpm_steps=None, progress=False)
    assert bad_rows[0]["frechet"] == real  # the same floor
    assert bad_rows[1]["frechet"] > 10 * real and bad_rows[1]["confident_share"] < 0.9  # measured ~250 and ~0.6

    written = _read_csv(out / "quality.csv")
    assert list(written[0]) == list(report.CSV_FIELDS)
    assert [(r["solver"], int(r["nfe"]), int(r["num"])) for r in written] == [
        (r["solver"], r["nfe"], r["num"]) for r in rows]
    for got, row in zip(written, rows):
        assert math.isclose(float(got["frechet"]), row["frechet"], rel_tol=1e-12)
        assert math.isclose(float(got["confident_share"]), row["confident_share"], rel_tol=1e-12)
    assert (out / "quality.png").stat().st_size > 1000


def test_finished_rows_are_on_disk_when_a_later_row_fails(train_digits, tmp_path):
    """A model that breaks after the first row (fault injected through ``log``, called after each row): the floor
    and the first row are in quality.csv, the error propagates, the plot shows what finished."""
    mixture = _mixture(train_digits[:100])
    state = {"broken": False}

    def model_fn(x, t):
        if state["broken"]:
            raise RuntimeError("model broke")
        return mixture.eps(x, t, SCHEDULE)

    def log(line):
        state["broken"] = True

    out = tmp_path / "eval"
    with pytest.raises(RuntimeError, match="model broke"):
        report.quality_table(model_fn, SCHEDULE, CONFIG, solvers=["dpmpp_2m", "ddim"], nfes=[6], num=130,
                             ddpm_steps=None, out_dir=str(out), log=log, progress=False)
    written = _read_csv(out / "quality.csv")
    assert [r["solver"] for r in written] == ["real (train vs held-out)", "dpmpp_2m"]
    assert all(math.isfinite(float(r["frechet"])) for r in written)
    assert (out / "quality.png").exists()


def test_bad_solver_or_nfe_fails_before_any_work(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(domain, "domain_metric", lambda *a, **k: calls.append(a))  # must not be reached
    model_fn = _mixture(np.zeros((2, 8, 8, 1), np.float32)).model_fn(SCHEDULE)
    with pytest.raises(ValueError, match="unknown solvers"):
        report.quality_table(model_fn, SCHEDULE, CONFIG, solvers=["dpmpp_2m", "nope"], nfes=[5],
                             out_dir=str(tmp_path / "a"))
    with pytest.raises(ValueError, match="solver .pndm. at NFE 5: .*too small"):
        report.quality_table(model_fn, SCHEDULE, CONFIG, solvers=["dpmpp_2m", "pndm"], nfes=[5],
                             ddpm_steps=None, out_dir=str(tmp_path / "b"))
    assert calls == [] and not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_generator_takes_params_without_recompiling(train_digits):
    """``make_generator``: a new params pytree reuses the compiled program, the last partial batch is padded (one
    program for 10 = 4 + 4 + 2 images), samples do not depend on how many are requested, and ``generate``'s
    closure form gives the same images as the params form."""
    def apply_fn(means, x, t):
        mixture = GaussianMixture(means=means, stds=jnp.full_like(means, 0.05),
                                  weights=jnp.full(means.shape[:1], 1.0 / means.shape[0]))
        return mixture.eps(x, t, SCHEDULE)

    means_a = jnp.asarray(train_digits[:50].reshape(50, -1))
    means_b = jnp.asarray(train_digits[50:100].reshape(50, -1))
    gen = report.make_generator(apply_fn, SCHEDULE, (8, 8, 1), solver="dpmpp_2m", nfe=6, batch_size=4)
    first = gen(means_a, 10, seed=1)
    second = gen(means_b, 10, seed=1)
    assert first.shape == (10, 8, 8, 1) and np.all(np.abs(first) <= 1.0)
    assert gen.sampler.cache_size() == 1
    assert np.abs(first - second).max() > 0.1  # the new params were used
    np.testing.assert_array_equal(gen(means_a, 6, seed=1), first[:6])
    closure = report.generate(lambda x, t: apply_fn(means_a, x, t), SCHEDULE, (8, 8, 1), solver="dpmpp_2m", nfe=6,
                              num=10, seed=1, batch_size=4)
    # the same computation compiled as two programs (closed-over vs argument means): a few float32 ulps
    np.testing.assert_allclose(closure, first, atol=1e-5)
    with pytest.raises(ValueError, match="num must be a positive integer"):
        gen(means_a, 0)
    with pytest.raises(ValueError, match="batch_size"):
        report.make_generator(apply_fn, SCHEDULE, (8, 8, 1), solver="dpmpp_2m", nfe=6, batch_size=0)
