"""Checkpoints: verified on restore (flipped bytes in a real checkpoint raise, naming the directory), never
non-finite (save refuses, restore refuses), legacy checkpoints warn, sharded states round-trip into the rule's
shardings, and the fingerprint is the same on host and on sharded devices."""
import glob
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

from dpmjax import sharding
from dpmjax.train import checkpoint
from dpmjax.train.loop import train
from dpmjax.workdir import load_params

from tiny_configs import tiny_unet_config  # noqa: E402  (tests/tiny_configs.py)


tiny_config = tiny_unet_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real training workdir: checkpoints at steps 1 and 2."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    train(trained_config(num_steps=2), str(workdir), quiet=True)
    return workdir


def trained_config(**train_overrides):
    return tiny_config(checkpoint_every=1, log_every=1, **train_overrides)


def copy_of(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def raw_restore(workdir, step, abstract=None):
    """What orbax alone returns (no verification)."""
    mngr = checkpoint.manager(str(workdir))
    try:
        args = ocp.args.StandardRestore(abstract) if abstract is not None else ocp.args.StandardRestore()
        return mngr.restore(step, args=ocp.args.Composite(state=args))["state"]
    finally:
        mngr.close()


def abstract_state(workdir):
    from dpmjax.nn import build_model, init_params
    from dpmjax.train import optim
    from dpmjax.train.state import create_train_state
    config = trained_config()
    model = build_model(config.model)
    tx = optim.make_optimizer(total_steps=4, **dict(config.optim))
    return jax.eval_shape(lambda: create_train_state(init_params(model, (8, 8, 1), 0), tx, 0))


# ------------------------------------------------------------------------------------------------ fingerprints

def test_fingerprint_is_the_same_on_host_and_on_sharded_devices_and_sees_one_changed_element(rng):
    tree = {"kernel": rng.standard_normal((16, 64)).astype(np.float32),
            "bf16": rng.standard_normal((8, 40)).astype(ml_dtypes.bfloat16),
            "count": np.int32(7), "key": np.array([3, 4], np.uint32), "flag": np.array([True, False]),
            "bytes": rng.integers(-100, 100, (24,)).astype(np.int8)}
    host = checkpoint.fingerprint(tree)
    mesh = sharding.make_mesh()
    placed = jax.device_put(tree, sharding.sharding_rule("fsdp", mesh, tree, min_size=100))
    assert placed["kernel"].sharding.spec == P(None, "data")
    assert checkpoint.fingerprint(placed) == host
    for name, change in (("kernel", lambda a: a.__setitem__((3, 5), np.nextafter(a[3, 5], np.float32(9)))),
                         ("bf16", lambda a: a.__setitem__((0, 0), -a[0, 0])),
                         ("key", lambda a: a.__setitem__(0, 4)),
                         ("kernel", lambda a: a.__setitem__(slice(None), a[::-1]))):  # swapped rows, same values
        changed = {k: np.array(v) for k, v in tree.items()}
        change(changed[name])
        after = checkpoint.fingerprint(changed)
        assert after[f"['{name}']"] != host[f"['{name}']"]
        assert {k: v for k, v in after.items() if k != f"['{name}']"} == \
            {k: v for k, v in host.items() if k != f"['{name}']"}


def test_fingerprint_of_float64_matches_on_device(x64, rng):
    tree = {"a": rng.standard_normal((8, 3)), "b": np.arange(16, dtype=np.int64)}
    assert checkpoint.fingerprint(jax.device_put(tree)) == checkpoint.fingerprint(tree)


# ------------------------------------------------------------------------------------------------ never non-finite

def test_save_refuses_a_non_finite_state_and_writes_nothing(tmp_path):
    state = {"params": {"w": np.ones((4, 4), np.float32), "b": np.array([0.0, np.inf], np.float32)},
             "step": np.int32(3)}
    mngr = checkpoint.manager(str(tmp_path), max_to_keep=2)
    try:
        with pytest.raises(FloatingPointError, match=r"refusing to save step 3 .*\['params'\]\['b'\]"):
            checkpoint.save(mngr, 3, state, {})
        assert mngr.latest_step() is None
    finally:
        mngr.close()
    assert glob.glob(str(tmp_path / "checkpoints" / "*")) == []


def test_a_nan_checkpoint_written_by_older_code_is_refused_on_restore_and_resume(trained, tmp_path, capsys):
    workdir = copy_of(trained, tmp_path)
    abstract = abstract_state(workdir)
    good = raw_restore(workdir, 2, abstract)
    poisoned = good.replace(params=jax.tree.map(lambda p: np.full(p.shape, np.nan, p.dtype), good.params))
    poisoned = jax.device_get(poisoned.replace(step=np.int32(3)))
    _, meta = checkpoint.restore_meta(str(workdir), 2)
    mngr = checkpoint.manager(str(workdir))
    try:  # what the pre-guard loop did: save whatever the state was, checksums of those values included
        mngr.save(3, args=ocp.args.Composite(
            state=ocp.args.StandardSave(poisoned),
            meta=ocp.args.JsonSave({**meta, "checksums": {"algorithm": checkpoint.CHECKSUM_ALGORITHM,
                                                          "arrays": checkpoint.fingerprint(poisoned)}})))
        mngr.wait_until_finished()
        with pytest.raises(checkpoint.CheckpointError, match=r"checkpoints/3 holds NaN or inf in \.params.*"
                                                             r"other checkpoints are steps \[1, 2\]"):
            checkpoint.restore(mngr, abstract)
    finally:
        mngr.close()
    with pytest.raises(checkpoint.CheckpointError, match="checkpoints/3 holds NaN or inf"):
        train(trained_config(num_steps=4), str(workdir), quiet=True)
    with pytest.raises(checkpoint.CheckpointError, match="checkpoints/3 holds NaN or inf"):
        load_params(str(workdir))  # sampling refuses it too, instead of writing NaN images with exit 0
    assert sorted(int(os.path.basename(p)) for p in glob.glob(str(workdir / "checkpoints" / "*"))) == [1, 2, 3]


# ------------------------------------------------------------------------------------------------ corruption

def largest_array_file(step_dir):
    files = [p for p in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
             if os.path.isfile(p) and not p.endswith((".json", "_METADATA", ".ocdbt", ".txt"))]
    return max(files, key=os.path.getsize)


def flip(path, offset, count):
    """XOR ``count`` bytes at ``offset`` with 0xA5 (calling it twice restores the file)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        data = bytearray(f.read(count))
        f.seek(offset)
        f.write(bytes(b ^ 0xA5 for b in data))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # tensorstore's decode errors
def test_flipped_bytes_in_a_real_checkpoint_raise_naming_the_directory(trained, tmp_path):
    """4 KB flipped in the middle of the largest array file. Where the bytes land in a zstd-compressed chunk,
    orbax itself fails to decode them; where they land in a stored (incompressible, e.g. random-init) chunk,
    orbax alone returns other values silently (up to 3e38 and NaN, issue 12): both must raise here. Windows
    (2 KB apart) are tried outward from the middle until one reaches stored bytes."""
    workdir = copy_of(trained, tmp_path)
    abstract = abstract_state(workdir)
    before = jax.tree.leaves(raw_restore(workdir, 2, abstract))
    path = largest_array_file(str(workdir / "checkpoints" / "2"))
    size, count = os.path.getsize(path), 4096
    assert size >= 4 * count, f"{path} holds only {size} bytes"
    seen = set()
    mngr = checkpoint.manager(str(workdir))
    try:
        for shift in [0] + [sign * k for k in range(1, 16) for sign in (1, -1)]:
            offset = size // 2 - count // 2 + shift * count // 2
            if not 0 <= offset <= size - count:
                continue
            flip(path, offset, count)
            try:
                after = jax.tree.leaves(raw_restore(workdir, 2, abstract))
            except Exception:  # noqa: BLE001 - orbax / tensorstore decoding errors
                case = "orbax fails"
                match = "checkpoints/2 is corrupt or incompatible"
            else:
                assert any(not np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)
                           for a, b in zip(before, after))
                case = "orbax silent"
                match = r"checkpoints/2 is corrupt: the restored values of \d+ of \d+ arrays differ.*use step 1"
            with pytest.raises(checkpoint.CheckpointError, match=match):
                checkpoint.restore(mngr, abstract)
            seen.add(case)
            if case == "orbax silent":
                with pytest.raises(checkpoint.CheckpointError, match="checkpoints/2 is corrupt"):
                    load_params(str(workdir))  # dpmjax.workdir restores through the same verification
                state, _ = checkpoint.restore(mngr, abstract, step=1)  # the undamaged one still restores
                assert int(state.step) == 1
                break
            flip(path, offset, count)  # undo; try the next window
    finally:
        mngr.close()
    assert "orbax silent" in seen, "no window reached stored array bytes: the test did not exercise the checksum"


def test_a_checkpoint_without_checksums_loads_with_a_warning(tmp_path):
    state = {"w": np.arange(6, dtype=np.float32)}
    mngr = checkpoint.manager(str(tmp_path))
    try:
        mngr.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({})))
        mngr.wait_until_finished()
        with pytest.warns(UserWarning, match="has no checksums"):
            restored, _ = checkpoint.restore(mngr, state)
    finally:
        mngr.close()
    np.testing.assert_array_equal(np.asarray(restored["w"]), state["w"])


# ------------------------------------------------------------------------------------------------ sharded states

def test_a_sharded_state_restores_into_the_rules_shardings(tmp_path, rng):
    mesh = sharding.make_mesh()
    tree = {"kernel": rng.standard_normal((64, 96)).astype(np.float32), "bias": np.zeros((96,), np.float32),
            "count": np.int32(4)}
    fsdp = sharding.sharding_rule("fsdp", mesh, tree, min_size=1000)
    placed = jax.device_put(tree, fsdp)
    mngr = checkpoint.manager(str(tmp_path))
    try:
        checkpoint.save(mngr, 1, placed, {"note": "fsdp"})
        for rule in ("fsdp", "replicate"):
            shardings = sharding.sharding_rule(rule, mesh, tree, min_size=1000)
            target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype, sharding=s),
                                  tree, shardings)
            restored, meta = checkpoint.restore(mngr, target)
            assert meta == {"note": "fsdp"}
            for name in tree:
                assert restored[name].sharding == shardings[name], (rule, name)
                np.testing.assert_array_equal(np.asarray(restored[name]), tree[name])
        assert restored["kernel"].sharding.spec == P()
        assert fsdp["kernel"].spec == P(None, "data")
    finally:
        mngr.close()


def test_keep_checkpoints_must_be_positive(tmp_path):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="keep_checkpoints"):
            checkpoint.manager(str(tmp_path), max_to_keep=bad)
