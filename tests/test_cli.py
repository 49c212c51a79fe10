"""The ``dpmjax`` command line end to end on tiny settings, through ``main([...])``.

Real runs: ``train`` (with config overrides), ``quickstart`` (its test-sized path), ``sample`` (defaults from the
workdir's ``config.sample``, flags overriding them, several solvers, ``--labels`` with classifier-free
guidance, DPM-Solver-v3 statistics), ``eval`` and ``ems``; non-finite weights and samples end in exit status 2.
Bad input: a table of wrong invocations, each of which must end in exit status 2 with one line
``dpmjax: error: ...`` naming the argument, before any checkpoint is restored, any training or sampling
starts, or any statistics are computed (those functions are replaced by ones that fail the test).

One class-conditional model serves every sampling test: configs/digits.py:cond,runlocal widened to 16
channels and trained for 300 steps at batch 32 (about 30-50 s on 2 busy cores, most of it compiling; timed
in ``test_train_writes_the_workdir_with_the_overrides``). That is enough for guidance to steer the class:
guided samples were classified as the requested digit about 0.55 of the time, unguided ones 0.12 (chance).
"""
import csv
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpmjax import main as cli
from dpmjax.config import load_config
from dpmjax.main import main

TRAIN = ["--config", "configs/digits.py:cond,runlocal", "--num-devices", "1", "--config.model.model_channels=16",
         "--config.train.num_steps=300", "--config.train.log_every=100", "--config.train.checkpoint_every=300",
         "--config.data.batch_size", "32", "--config.optim.learning_rate=3e-3"]


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(workdir, seconds): ``dpmjax train`` of the class-conditional test model, once per session."""
    workdir = tmp_path_factory.mktemp("cli") / "cond"
    start = time.perf_counter()
    assert main(["train", "--workdir", str(workdir)] + TRAIN) == 0
    return workdir, time.perf_counter() - start


@pytest.fixture(scope="session")
def digits_classifier():
    """The digits domain classifier (trained and cached on first use, ~25 s). Its optax step mixes an int
    count with floats, which the suite's strict dtype promotion rejects: build it under standard promotion."""
    from dpmjax.metrics.domain import domain_metric

    with jax.numpy_dtype_promotion("standard"):
        return domain_metric("digits")


def _copy(workdir, tmp_path, name="copy"):
    """A private copy of the trained workdir, for tests that write into it or change its config."""
    return shutil.copytree(workdir, tmp_path / name)


def _edit_config(workdir, **sample):
    path = os.path.join(workdir, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["sample"].update(sample)
    with open(path, "w") as f:
        json.dump(config, f)


# ------------------------------------------------------------------------------------------------ train / quickstart

def test_train_writes_the_workdir_with_the_overrides(trained, capsys):
    workdir, seconds = trained
    print(f"\ntraining the CLI test model took {seconds:.1f} s")
    with open(workdir / "config.json") as f:
        config = json.load(f)
    assert config["model"]["model_channels"] == 16 and config["model"]["num_classes"] == 10  # override + variant
    assert config["train"]["num_steps"] == 300 and config["data"]["batch_size"] == 32
    assert config["sample"]["guidance_scale"] == 2.0 and config["train"]["sharding"] == "replicate"
    assert (workdir / "checkpoints" / "300").is_dir()
    with open(workdir / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [100, 200, 300] and rows[-1]["loss"] < rows[0]["loss"]


def test_training_runs_under_the_transfer_guard(monkeypatch, tmp_path):
    """The CLI trains with implicit device -> host transfers disallowed (explicit jax.device_get only)."""
    from dpmjax.train import loop

    seen = []
    monkeypatch.setattr(loop, "train", lambda *a, **k: seen.append(jax.config.jax_transfer_guard_device_to_host))
    outside = jax.config.jax_transfer_guard_device_to_host
    args = ["train", "--config", "configs/digits.py:runlocal", "--workdir", str(tmp_path / "w")]
    assert main(args) == 0 and main(args + ["--transfer-guard", "log"]) == 0
    assert seen == ["disallow", "log"]
    assert jax.config.jax_transfer_guard_device_to_host == outside  # restored after the run


def test_quickstart_trains_samples_and_writes_the_table(trained, digits_classifier, tmp_path, capsys):
    """The test-sized path of the main job: same wiring as ``dpmjax quickstart``, seconds instead of minutes
    (the train step compiled for ``trained`` is reused: same config)."""
    workdir = tmp_path / "quick"
    assert main(["quickstart", "--workdir", str(workdir), "--num", "32", "--nfe", "4", "--ddpm-steps", "10",
                 "--ddpm-num", "16"] + TRAIN) == 0
    out = capsys.readouterr().out
    assert "[1/3] training" in out and "[3/3] quality" in out
    with open(workdir / "eval" / "quality.csv") as f:
        rows = [line.split(",")[:2] for line in f.read().splitlines()[1:]]
    assert rows == [["real (train vs held-out)", "0"], ["dpmpp_2m", "4"], ["ddpm", "10"]]
    assert (workdir / "samples_dpmpp_2m_nfe4.png").is_file() and (workdir / "checkpoints" / "300").is_dir()


# ------------------------------------------------------------------------------------------------ sample

def test_sample_defaults_come_from_config_sample_and_flags_override_them(trained, tmp_path, capsys):
    workdir = _copy(trained[0], tmp_path)
    _edit_config(workdir, solver="unipc", nfe=4, spacing="time_uniform", guidance_scale=1.5)
    assert main(["sample", "--workdir", str(workdir), "--num", "8"]) == 0
    out = capsys.readouterr().out
    assert "loading" in out and "compiles" in out and "wrote" in out  # progress, not minutes of silence
    saved = np.load(workdir / "samples_unipc_nfe4.npz")
    assert (str(saved["solver"]), int(saved["nfe"]), str(saved["spacing"])) == ("unipc", 4, "time_uniform")
    assert float(saved["guidance_scale"]) == 1.5 and saved["images"].shape == (8, 8, 8, 1)
    np.testing.assert_array_equal(saved["labels"], np.arange(8))  # every class in turn by default
    assert (workdir / "samples_unipc_nfe4.png").is_file()

    out_file = tmp_path / "several.npz"
    assert main(["sample", "--workdir", str(workdir), "--solvers", "ddim,dpmpp_2m", "--nfe", "3", "--num", "8",
                 "--labels", "7", "--guidance-scale", "0", "--spacing", "logSNR", "--out", str(out_file)]) == 0
    for solver in ("ddim", "dpmpp_2m"):  # not only the first of the list
        saved = np.load(tmp_path / f"several_{solver}_nfe3.npz")
        assert (str(saved["solver"]), int(saved["nfe"]), str(saved["spacing"])) == (solver, 3, "logSNR")
        assert float(saved["guidance_scale"]) == 0.0 and set(saved["labels"].tolist()) == {7}


def test_guided_samples_are_classified_as_the_requested_class(trained, digits_classifier, tmp_path):
    """``--labels`` with classifier-free guidance draws the requested digits: a classifier labels guided
    samples as the requested class more often than unguided ones (scale 0: the null class, ~10 %), by a
    margin of 3 standard errors of the difference of two proportions of n samples each."""
    num = 200
    labels = ",".join(map(str, range(10)))
    accuracy = {}
    for scale in ("0", "2"):
        path = tmp_path / f"g{scale}.npz"
        assert main(["sample", "--workdir", str(trained[0]), "--labels", labels, "--guidance-scale", scale,
                     "--num", str(num), "--out", str(path)]) == 0
        saved = np.load(path)
        np.testing.assert_array_equal(saved["labels"], np.arange(num) % 10)
        logits = digits_classifier.module.apply(digits_classifier.params, jnp.asarray(saved["images"]))
        accuracy[scale] = float(np.mean(np.asarray(logits).argmax(-1) == saved["labels"]))
    pooled = (accuracy["0"] + accuracy["2"]) / 2
    margin = 3 * np.sqrt(pooled * (1 - pooled) * 2 / num)
    assert accuracy["2"] - accuracy["0"] > margin, (accuracy, margin)


def test_dpm_solver_v3_uses_the_statistics_dpmjax_ems_wrote(trained, tmp_path, capsys):
    workdir = _copy(trained[0], tmp_path)
    assert main(["ems", "--workdir", str(workdir), "--num-grid", "20", "--num-samples", "32"]) == 0
    written = workdir / "ems" / "ems_N20_K32.npz"
    assert written.is_file() and str(written) in capsys.readouterr().out
    common = ["sample", "--workdir", str(workdir), "--solver", "dpm_solver_v3", "--nfe", "5", "--num", "16"]
    assert main(common + ["--out", str(tmp_path / "ems.npz")]) == 0
    assert f"statistics {written}" in capsys.readouterr().out  # says which file
    assert main(common + ["--ems", "none", "--out", str(tmp_path / "none.npz")]) == 0
    assert "degenerate statistics" in capsys.readouterr().out
    with_ems, without = np.load(tmp_path / "ems.npz")["images"], np.load(tmp_path / "none.npz")["images"]
    assert np.abs(with_ems - without).max() > 1e-3  # the statistics change the solver: they were used

    from dpmjax.schedules import schedule_from_config
    from dpmjax.workdir import ems_files, load_workdir_ems
    newer = workdir / "ems" / "ems_N20_K32_newer.npz"
    shutil.copy(written, newer)
    os.utime(newer, (time.time() + 60, time.time() + 60))
    schedule = schedule_from_config(load_config("digits.py").schedule)
    assert ems_files(str(workdir)) == [str(newer), str(written)]
    assert load_workdir_ems(str(workdir), schedule)[1] == str(newer)  # the newest, unless --ems names one
    assert load_workdir_ems(str(workdir), schedule, str(written))[1] == str(written)


# ------------------------------------------------------------------------------------------------ eval

def test_eval_writes_a_row_per_solver_and_nfe(trained, digits_classifier, tmp_path, capsys):
    out_dir = tmp_path / "table"
    assert main(["eval", "--workdir", str(trained[0]), "--solvers", "ddim,dpmpp_2m", "--nfe", "3", "--num", "32",
                 "--out-dir", str(out_dir)]) == 0
    with open(out_dir / "quality.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["solver"], r["nfe"]) for r in rows] == [("real (train vs held-out)", "0"), ("ddim", "3"),
                                                       ("dpmpp_2m", "3")]
    assert all(np.isfinite(float(r["frechet"])) for r in rows)
    assert (out_dir / "quality.png").is_file() and "dpmpp_2m" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ non-finite

def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert err.startswith("dpmjax: error: ") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def test_non_finite_weights_fail_with_a_message(trained, tmp_path, monkeypatch, capsys):
    from dpmjax import workdir as workdir_lib

    real = workdir_lib.load_params

    def nan_params(workdir, **kwargs):
        model, params, schedule, config = real(workdir, **kwargs)
        return model, jax.tree.map(lambda a: a * np.nan, params), schedule, config

    monkeypatch.setattr(workdir_lib, "load_params", nan_params)
    out = tmp_path / "nan.npz"
    assert main(["sample", "--workdir", str(trained[0]), "--num", "8", "--out", str(out)]) == 2
    _one_line_error(capsys, "checkpoint step 300", "non-finite weights")
    assert not out.exists()
    assert main(["eval", "--workdir", str(trained[0]), "--num", "8", "--out-dir", str(tmp_path / "e")]) == 2
    _one_line_error(capsys, "non-finite weights")
    assert not (tmp_path / "e" / "quality.csv").exists()


def test_non_finite_samples_fail_with_a_message(trained, tmp_path, monkeypatch, capsys):
    """Finite weights, but the network returns NaN for one sample: the CLI stops, exit 2, and writes nothing."""
    import dpmjax.nn as nn_lib

    real = nn_lib.make_apply_fn

    def poisoned(module, schedule):
        apply_fn = real(module, schedule)
        return lambda params, x, t, **cond: apply_fn(params, x, t, **cond).at[0].set(jnp.nan)

    monkeypatch.setattr(nn_lib, "make_apply_fn", poisoned)
    out = tmp_path / "nan.npz"
    assert main(["sample", "--workdir", str(trained[0]), "--num", "8", "--guidance-scale", "1", "--nfe", "3",
                 "--out", str(out)]) == 2
    _one_line_error(capsys, "1 of 8 samples", "not finite")
    assert not out.exists() and not (tmp_path / "nan.png").exists()


# ------------------------------------------------------------------------------------------------ help

def test_every_flag_has_help_with_its_default(capsys):
    """Every option of every subcommand has a help text that states its default (argparse's "(default: X)"
    for options with a value, words for options whose default depends on the workdir)."""
    import argparse

    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    assert set(subparsers.choices) == {"quickstart", "train", "sample", "eval", "ems", "solvers", "convert", "finetune",
                                       "delta", "serve"}
    commands = dict(subparsers.choices)
    for name, sub in list(commands.items()):  # nested commands: `dpmjax delta prune`
        for action in sub._actions:  # noqa: SLF001
            if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
                commands.update({f"{name} {nested}": parser for nested, parser in action.choices.items()})
    assert "delta prune" in commands
    for name, sub in commands.items():
        formatter = sub._get_formatter()  # noqa: SLF001
        for action in sub._actions:  # noqa: SLF001
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.required:  # noqa: SLF001
                continue
            text = formatter._get_help_string(action) or ""  # noqa: SLF001 - the text --help prints
            where = f"dpmjax {name} {'/'.join(action.option_strings)}"
            if action.default is False:  # a switch: its help says what it turns on
                assert text, where
            elif action.default is None:
                assert "default" in text, f"{where}: say what happens without it"
            else:
                assert "(default: %(default)s)" in text or "default" in text, f"{where}: default not shown"
    assert main(["sample", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--guidance-scale" in out and "(default: 500)" in " ".join(out.split())


# ------------------------------------------------------------------------------------------------ bad input

@pytest.fixture(scope="module")
def fake_workdirs(tmp_path_factory):
    """Workdirs with a config.json and an (empty) checkpoint folder: enough for every check that must run
    before a restore; restoring one would fail the test anyway (see ``no_heavy_work``)."""
    root = tmp_path_factory.mktemp("fake")
    for name, spec in (("uncond", "digits.py:runlocal"), ("cond", "digits.py:cond,runlocal")):
        (root / name / "checkpoints" / "10").mkdir(parents=True)
        (root / name / "config.json").write_text(load_config(spec).to_json())
    (root / "a_file").write_text("not a folder")
    return root


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Replace everything that restores, trains, samples a model or computes statistics by a failure."""
    import dpmjax
    from dpmjax import workdir as workdir_lib
    from dpmjax.metrics import report
    from dpmjax.train import loop

    def forbidden(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"{name} ran for an invocation that should have been refused first")
        return fail

    for owner, name in ((workdir_lib, "load_params"), (workdir_lib, "load_for_sampling"),
                        (workdir_lib, "compute_workdir_ems"), (loop, "train"), (report, "quality_table"),
                        (dpmjax, "make_sampler")):
        monkeypatch.setattr(owner, name, forbidden(f"{owner.__name__}.{name}"))


TRAIN_BASE = ["train", "--config", "configs/digits.py:runlocal", "--workdir", "{T}/w"]
BAD = [
    (["sample", "--workdir", "{T}/missing"], "--workdir: workdir"),
    (["sample", "--workdir", "{F}"], "--workdir: workdir {F} is a file"),
    (["sample", "--workdir", "{U}", "--num", "0"], "argument --num: expected a positive integer, got '0'"),
    (["sample", "--workdir", "{U}", "--nfe", "0"], "argument --nfe"),
    (["sample", "--workdir", "{U}", "--nfe", "5,x"], "argument --nfe"),
    (["sample", "--workdir", "{U}", "--solver", "dpmpp_9m"], "--solver: unknown solver 'dpmpp_9m'"),
    (["sample", "--workdir", "{U}", "--solvers", "dpmpp_2m,nonsense"], "unknown solver 'nonsense'"),
    (["sample", "--workdir", "{U}", "--spacing", "cubic"], "--spacing: unknown spacing 'cubic'"),
    (["sample", "--workdir", "{U}", "--solver", "pndm", "--nfe", "5"], "--solver pndm --nfe 5: nfe=5 is too small"),
    (["sample", "--workdir", "{U}", "--out", "{T}/no/such/dir/x.npz"], "--out {T}/no/such/dir/x.npz: directory"),
    (["sample", "--workdir", "{U}", "--out", "{T}/x.png"], "must end in .npz"),
    (["sample", "--workdir", "{U}", "--labels", "3"], "--labels: {U} holds an unconditional model"),
    (["sample", "--workdir", "{U}", "--guidance-scale", "2"], "--guidance-scale: {U} holds an unconditional model"),
    (["sample", "--workdir", "{C}", "--labels", "10"], "--labels: 10 is not a class of this model"),
    (["sample", "--workdir", "{C}", "--labels", "a"], "argument --labels"),
    (["sample", "--workdir", "{C}", "--guidance-scale", "-1"], "argument --guidance-scale"),
    (["sample", "--workdir", "{U}", "--solver", "dpm_solver_v3"], "compute them with `dpmjax ems --workdir {U}`"),
    (["sample", "--workdir", "{U}", "--solver", "dpm_solver_v3", "--ems", "{T}/x.npz"], "--ems: EMS file"),
    (["sample", "--workdir", "{U}", "--ems", "{T}/x.npz"], "--ems: statistics are used by --solver dpm_solver_v3"),
    (["sample", "--workdir", "{U}", "--oracle", "ring"], "--oracle applies to the oracle"),
    (["sample", "--workdir", "{U}", "--bogus"], "unrecognized arguments: --bogus"),
    (["sample", "--labels", "3"], "--labels applies to a trained model"),
    (["sample", "--oracle", "torus"], "--oracle: unknown oracle 'torus'"),
    (["sample", "--solvers", "nonsense"], "--solvers: unknown solver 'nonsense'"),
    (["eval", "--workdir", "{U}", "--solvers", "dpmpp_2m,nonsense"], "unknown solver 'nonsense'"),
    (["eval", "--workdir", "{U}", "--solvers", "dpmpp_2m,pndm", "--nfe", "20,5"], "--solver pndm --nfe 5"),
    (["eval", "--workdir", "{U}", "--out-dir", "{F}/sub"], "--out-dir"),
    (["eval", "--workdir", "{U}", "--fid-num", "-1"], "argument --fid-num"),
    (TRAIN_BASE + ["--config.train.num_steps=abc"], "--config.train.num_steps=abc: expected an integer"),
    (TRAIN_BASE + ["--config.train.num_steps=1.5"], "--config.train.num_steps=1.5: expected an integer"),
    (TRAIN_BASE + ["--config.train.checkpoint_every=0"], "config.train.checkpoint_every must be a positive"),
    (TRAIN_BASE + ["--config.train.nums_steps=3"], "did you mean 'train.num_steps'"),
    (TRAIN_BASE + ["--config.train.sharding=zero"], "config.train.sharding must be one of"),
    (TRAIN_BASE + ["--learning-rate", "3"], "unrecognised argument '--learning-rate'"),
    (TRAIN_BASE + ["--num-devices", "99"], "--num-devices 99: only 8 device(s)"),
    (TRAIN_BASE + ["--transfer-guard", "sometimes"], "argument --transfer-guard: invalid choice"),
    (["train", "--config", "configs/nope.py", "--workdir", "{T}/w"], "--config: no config file"),
    (["train", "--config", "configs/digits.py:bogus", "--workdir", "{T}/w"], "unknown variant 'bogus'"),
    (["train", "--config", "configs/digits.py", "--workdir", "{F}/sub"], "--workdir {F}/sub: {F} is a file"),
    (["train", "--workdir", "{T}/w"], "the following arguments are required: --config"),
    (["ems", "--workdir", "{T}/missing"], "--workdir: workdir"),
    (["ems", "--workdir", "{U}", "--num-grid", "0"], "argument --num-grid"),
    (["quickstart", "--workdir", "{T}/q", "--num", "0"], "argument --num"),
    (["quickstart", "--workdir", "{F}/sub"], "--workdir"),
    (["quickstart", "--workdir", "{T}/q", "--config.train.num_steps=abc"], "--config.train.num_steps=abc"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a)[:60] for a, _ in BAD])
def test_bad_invocations_fail_early_with_one_line_naming_the_argument(argv, message, fake_workdirs, tmp_path,
                                                                      no_heavy_work, capsys):
    names = {"{U}": str(fake_workdirs / "uncond"), "{C}": str(fake_workdirs / "cond"),
             "{F}": str(fake_workdirs / "a_file"), "{T}": str(tmp_path)}

    def fill(text):
        for key, value in names.items():
            text = text.replace(key, value)
        return text

    start = time.perf_counter()
    assert main([fill(a) for a in argv]) == 2
    _one_line_error(capsys, fill(message))
    assert time.perf_counter() - start < 30  # nothing heavy ran (generous: 2 shared cores)
    assert not os.path.exists(os.path.join(str(tmp_path), "w", "checkpoints"))
