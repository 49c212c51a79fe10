"""Sharding rules (replicate / fsdp) and fsdp training: the same loss trajectory as replicate with ~1/8 of the
parameter bytes per device on 8 simulated devices; bad rules and undivisible parameters are named before any
compile."""
import json
import os

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dpmjax import sharding
from dpmjax.train.loop import train
from tiny_configs import tiny_dit_config  # noqa: E402  (tests/tiny_configs.py)


def abstract(*shapes):
    return {f"w{i}": jax.ShapeDtypeStruct(shape, np.float32) for i, shape in enumerate(shapes)}


def test_fsdp_splits_the_largest_divisible_axis_and_replicates_small_leaves():
    mesh = sharding.make_mesh()
    tree = abstract((3, 3, 16, 64), (4096, 12), (12, 4096), (64,), (7, 9, 104))
    specs = jax.tree.map(lambda s: s.spec, sharding.sharding_rule("fsdp", mesh, tree, min_size=1000))
    assert specs == {"w0": P(None, None, None, "data"), "w1": P("data", None), "w2": P(None, "data"),
                     "w3": P(), "w4": P(None, None, "data")}  # w4: only 104 = 8 x 13 divides
    replicated = sharding.sharding_rule("replicate", mesh, tree)
    assert all(s.spec == P() for s in jax.tree.leaves(replicated))


def test_fsdp_names_a_large_parameter_with_no_divisible_axis_and_bad_rules():
    mesh = sharding.make_mesh()
    with pytest.raises(ValueError, match=r"parameter \['w1'\] of shape \(7, 9, 101\)"):
        sharding.sharding_rule("fsdp", mesh, abstract((64, 64), (7, 9, 101)), min_size=1000)
    with pytest.raises(ValueError, match="sharding rule must be one of"):
        sharding.sharding_rule("zero3", mesh, abstract((8,)))


def test_bytes_per_device_counts_shards():
    mesh = sharding.make_mesh()
    tree = {"big": np.ones((64, 32), np.float32), "small": np.ones((4,), np.float32)}
    shardings = sharding.sharding_rule("fsdp", mesh, tree, min_size=1000)
    placed = jax.device_put(tree, shardings)
    held = sharding.bytes_per_device(placed)
    assert len(held) == 8 and set(held.values()) == {64 * 32 * 4 // 8 + 16}


def dit_config(rule):
    """The shared one-block DiT (tests/tiny_configs.py) under ``rule``."""
    return tiny_dit_config(num_steps=3, checkpoint_every=3, sharding=rule)


def test_fsdp_trains_like_replicate_with_an_eighth_of_the_parameter_bytes(tmp_path):
    states, history = {}, {}
    for rule in ("replicate", "fsdp"):
        states[rule] = train(dit_config(rule), str(tmp_path / rule), quiet=True)
        with open(tmp_path / rule / "metrics.jsonl") as f:
            history[rule] = [json.loads(line)["loss"] for line in f]
    assert len(history["fsdp"]) == 3
    # Same math; the gradient reduction differs (reduce-scatter vs all-reduce): float32 rounding only.
    np.testing.assert_allclose(history["fsdp"], history["replicate"], rtol=1e-5)
    assert history["fsdp"][0] != history["fsdp"][2]  # the steps did change the parameters
    for rule, state in states.items():
        for name, tree in (("params", state.params), ("ema", state.ema_params), ("adam", state.opt_state)):
            total = sum(leaf.nbytes for leaf in jax.tree.leaves(tree))
            most = max(sharding.bytes_per_device(tree).values())
            if rule == "replicate":
                assert most == total, name
            else:
                # 1/8 of the kernels plus the replicated leaves under FSDP_MIN_SIZE (biases, the step count).
                assert total / 8 <= most <= 1.2 * total / 8, (name, most / total)
    fsdp_leaf = states["fsdp"].params["params"]["block_0"]["mlp_in"]["kernel"]
    assert fsdp_leaf.sharding.spec == P("data", None) or fsdp_leaf.sharding.spec == P(None, "data")
    np.testing.assert_allclose(np.asarray(fsdp_leaf),
                               np.asarray(states["replicate"].params["params"]["block_0"]["mlp_in"]["kernel"]),
                               rtol=1e-5, atol=1e-7)


def test_bad_rule_and_undivisible_fsdp_are_refused_before_compiling(tmp_path, monkeypatch):
    import dpmjax.train.loop as loop

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled or restored before validating")

    monkeypatch.setattr(loop, "_cached", no_compile)  # the jitted init and step are built only through it
    with pytest.raises(ValueError, match="config.train.sharding must be one of"):
        train(dit_config("zero"), str(tmp_path / "a"), quiet=True)
    config = dit_config("fsdp")
    with config.unlocked():
        config.model.hidden_size = 60  # e.g. the qkv kernel is 60 x 180: no axis divisible by 8
    with pytest.raises(ValueError, match=r"parameter \.params\['params'\]\['block_0'\]\[.*has no axis divisible by "
                                         r"the 8 devices"):
        train(config, str(tmp_path / "b"), quiet=True)
    assert not os.path.exists(tmp_path / "b" / "checkpoints" / "0")
