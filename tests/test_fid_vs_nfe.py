"""Smoke test of experiments/fid_vs_nfe.py on a tiny random model: sharded sampling over the 8 simulated devices,
reference statistics from a pytorch-fid npz and from TFDS (mock data), the CSV / table / plot.

The FID Inception network is replaced by a cheap 64-d stand-in feature map here (its own tests cover it; on
this CPU it costs about a minute per 16 images with compilation, and sqrtm at d = 2048 another ~30 s);
everything else runs as on a GPU.
"""
import importlib.util
import os

import numpy as np
import pytest

from dpmjax.metrics import fid

FEATURES = 64
SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "fid_vs_nfe.py")


@pytest.fixture
def experiment(monkeypatch):
    spec = importlib.util.spec_from_file_location("fid_vs_nfe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def statistics(params, images, **kwargs):  # uint8 images -> 64 features (pixels), float64 stats
        stats = fid.RunningStats(dim=FEATURES)
        for batch in images:
            flat = np.asarray(batch, np.float64).reshape(len(batch), -1) / 255.0
            stats.update(flat[:, :FEATURES])
        return stats.statistics()

    monkeypatch.setattr(module, "load_inception_params", lambda path=None: {})
    monkeypatch.setattr(module.fid, "compute_statistics", statistics)
    return module


def test_fid_vs_nfe_runs_on_a_tiny_model(experiment, tmp_path):
    stats = tmp_path / "stats.npz"
    fid.save_statistics(stats, np.full(FEATURES, 0.5), np.eye(FEATURES))
    out = tmp_path / "results"
    with pytest.warns(fid.SingularCovarianceWarning):
        # one compiled sampler (each costs ~1 min here, partitioned over 8 simulated devices)
        rows = experiment.main(["--model", "random-tiny", "--num-samples", "12", "--batch-size", "8", "--nfe", "3",
                                "--solvers", "dpmpp_2m", "--reference", str(stats), "--out-dir", str(out)])
    assert [(r["solver"], r["nfe"]) for r in rows] == [("dpmpp_2m", 3)] and np.isfinite(rows[0]["fid"])
    for name in ("fid_vs_nfe.csv", "fid_vs_nfe.md", "fid_vs_nfe.png"):
        assert (out / name).stat().st_size > 0
    table = (out / "fid_vs_nfe.md").read_text()
    assert "| dpmpp_2m |" in table and "ScoreSDE" in table
