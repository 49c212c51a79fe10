"""The methods layer's loop (dpmjax.methods.loop): checkpoints, resume, the non-finite stop, frozen arrays as
arguments, the output workdir, bad input -- on a toy method, so each test fails only for the loop's own bugs.

The toy method (``TOY``, registered under "toy" by the ``toy_method`` fixture) pulls a vector w towards the mean
of the frozen teacher's first kernel, and turns its state to NaN at update ``nan_at`` when asked.
"""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dpmjax.methods import loop
from dpmjax.methods.base import Method, Program


def _first_leaf(params):
    return jax.tree.leaves(params)[0]


def toy_validate(config, teacher):
    if config.method.get("rate", 0.5) <= 0:
        raise ValueError("config.method.rate must be positive")


def toy_build(config, teacher):
    rate = float(config.method.get("rate", 0.5))
    nan_at = int(config.method.get("nan_at", 0))

    def init(frozen, key):
        return {"step": jnp.zeros((), jnp.int32), "w": jax.random.normal(key, (4,)),
                "network": jax.tree.map(jnp.copy, frozen["teacher"])}

    def update(state, batch, frozen, key):
        target = jnp.mean(_first_leaf(frozen["teacher"])) + jnp.mean(batch["image"]) * 0.0
        w = state["w"] - rate * (state["w"] - target) + 0.01 * jax.random.normal(key, (4,))
        step = state["step"] + 1
        if nan_at:
            w = jnp.where(step >= nan_at, jnp.nan, w)
        return {"step": step, "w": w, "network": state["network"]}, {"loss": jnp.sum((w - target) ** 2)}

    return Program(init=init, update=update, frozen={"teacher": teacher.params},
                   student=lambda state, use_ema: state["network"], metric_names=("loss",),
                   output={"sample": {"solver": "ddim", "nfe": 3}})


TOY = Method(name="toy", build=toy_build, validate=toy_validate, doc="a test method")
METHOD = TOY


@pytest.fixture
def toy_method(monkeypatch):
    import dpmjax.methods as methods

    monkeypatch.setitem(methods.METHOD_MODULES, "toy", __name__)


def toy_config(**method):
    return ml_collections.ConfigDict({
        "seed": 0, "method": {"name": "toy", "rate": 0.5, "nan_at": 0, **method}, "data": {"batch_size": 8},
        "optim": {"learning_rate": 1e-3},
        "train": {"num_steps": 6, "log_every": 2, "checkpoint_every": 2, "keep_checkpoints": 2,
                  "sharding": "replicate", "ema_decay": 0.0}})


def test_output_workdir_loads_like_any_workdir(toy_method, digits_teacher, tmp_path):
    teacher_dir, teacher = digits_teacher
    out = str(tmp_path / "toy")
    state = loop.finetune("toy", teacher, toy_config(), out, num_devices=1, quiet=True)
    assert int(state.step) == 6
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["method"]["name"] == "toy" and config["teacher"]["workdir"] == os.path.abspath(teacher_dir)
    assert config["model"] == json.loads(teacher.config.model.to_json())  # the teacher's network
    assert config["sample"]["solver"] == "ddim" and config["sample"]["nfe"] == 3  # the program's output section
    from dpmjax.workdir import load_params

    _, variables, _, loaded = load_params(out)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(teacher.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [2, 4, 6] and all(np.isfinite(r["loss"]) for r in rows)


def test_resume_continues_exactly(toy_method, digits_teacher, tmp_path):
    _, teacher = digits_teacher
    whole = loop.finetune("toy", teacher, toy_config(), str(tmp_path / "a"), num_devices=1, quiet=True)
    loop.finetune("toy", teacher, toy_config(), str(tmp_path / "b"), num_devices=1, quiet=True, stop_after=2)
    resumed = loop.finetune("toy", teacher, toy_config(), str(tmp_path / "b"), num_devices=1, quiet=True)
    np.testing.assert_allclose(np.asarray(resumed.method["w"]), np.asarray(whole.method["w"]), rtol=1e-6)
    with pytest.raises(ValueError, match="rate"):  # a config change that alters the run is refused on resume
        loop.finetune("toy", teacher, toy_config(rate=0.25), str(tmp_path / "b"), num_devices=1, quiet=True)


def test_nonfinite_state_stops_and_keeps_the_last_good_checkpoint(toy_method, digits_teacher, tmp_path):
    """NaN at update 3 with checkpoints every 2 steps and logs every 2: the checkpoint at step 2 stays, the
    run stops naming it, nothing non-finite is written (checkpoint steps are checked, not only log steps)."""
    _, teacher = digits_teacher
    out = str(tmp_path / "nan")
    config = toy_config(nan_at=3)
    with config.unlocked():
        config.train.log_every = 3
    with pytest.raises(FloatingPointError, match=r"step 3.*last finite checkpoint is step 2"):
        loop.finetune("toy", teacher, config, out, num_devices=1, quiet=True)
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["2"]


def test_frozen_arrays_are_arguments_not_constants(toy_method, digits_teacher):
    """Another teacher of the same shapes runs through the same compiled update (no recompilation), and its
    values reach the update (the target moves)."""
    _, teacher = digits_teacher
    config = toy_config()
    program = toy_build(config, teacher)
    mesh = loop.make_mesh(1)
    state = loop.FinetuneState(step=jnp.zeros((), jnp.int32), key=jax.random.key_data(jax.random.key(0)),
                               method=program.init(program.frozen, jax.random.key(0)))
    shardings = loop.sharding_rule("replicate", mesh, state)
    frozen_sh = loop.sharding_rule("replicate", mesh, program.frozen)
    step = loop.make_finetune_step(program, mesh, shardings, frozen_sh)
    batch = {"image": jnp.zeros((8, 8, 8, 1)), "label": jnp.zeros((8,), jnp.int32)}
    shifted = jax.tree.map(lambda a: a + 5.0, program.frozen)
    s1, _ = step(jax.tree.map(jnp.copy, state), batch, program.frozen)
    s2, _ = step(jax.tree.map(jnp.copy, state), batch, shifted)
    assert step.jitted._cache_size() == 1
    assert float(jnp.mean(s2.method["w"] - s1.method["w"])) == pytest.approx(0.5 * 5.0, rel=1e-4)


def test_bad_input_fails_before_anything_runs(toy_method, digits_teacher, tmp_path):
    teacher_dir, teacher = digits_teacher
    with pytest.raises(ValueError, match="unknown method"):
        loop.finetune("nope", teacher, toy_config(), str(tmp_path / "x"))
    with pytest.raises(ValueError, match="rate must be positive"):
        loop.finetune("toy", teacher, toy_config(rate=-1.0), str(tmp_path / "x"))
    config = toy_config()
    with config.unlocked():
        config.data.image_shape = (28, 28, 1)
    with pytest.raises(ValueError, match=r"trained on images of shape \(8, 8, 1\)"):
        loop.finetune("toy", teacher, config, str(tmp_path / "x"))
    with pytest.raises(ValueError, match="teacher's workdir"):
        loop.finetune("toy", teacher, toy_config(), teacher_dir)
    with pytest.raises(ValueError, match="the config is for method 'toy'"):
        loop.finetune("mmd_ddm", teacher, toy_config(), str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / "x")  # nothing was created by a refused run


def test_every_shipped_method_config_loads_and_names_a_registered_method():
    import glob

    from dpmjax.config import configs_dir, load_config
    from dpmjax.methods import METHOD_MODULES, get_method

    paths = sorted(glob.glob(os.path.join(configs_dir(), "methods", "*.py")))
    assert {os.path.basename(p)[:-3] for p in paths} >= set(METHOD_MODULES)  # one default config per method
    for path in paths:
        config = load_config(path)
        assert get_method(config.method.name).name == config.method.name, path
        assert config.train.keep_checkpoints >= 1 and config.data.batch_size >= 1, path
