"""Data pipelines: datasets (digits, idx, TFDS mock, image folder) and the seeded, resumable, sharded iterator."""
import gzip
import json
import os
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from dpmjax import data
from dpmjax.data import idx as idx_lib

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


# ----------------------------------------------------------------------------------------------- digits
def test_digits_shapes_ranges_and_class_counts():
    train, test, full = (data.get_dataset("digits", s) for s in ("train", "test", "all"))
    assert (len(train), len(test), len(full)) == (1442, 355, 1797)
    for source in (train, test, full):
        assert source.image_shape == (8, 8, 1) and source.num_classes == 10
        assert source.images.dtype == np.float32 and source.labels.dtype == np.int32
        assert source.images.min() == -1.0 and source.images.max() == 1.0
        # Gray levels 0..16 map onto a grid of step 1/8.
        np.testing.assert_array_equal(source.images * 8, np.round(source.images * 8))
    # Published class sizes of sklearn's digits (load_digits docs: ~180 per class).
    np.testing.assert_array_equal(np.bincount(full.labels), [178, 182, 177, 183, 181, 182, 181, 179, 174, 180])
    np.testing.assert_array_equal(np.bincount(test.labels), np.bincount(full.labels) // 5)
    # The split partitions the set: test rows + train rows are exactly the full set.
    mask = data.digits.heldout_mask(full.labels)
    np.testing.assert_array_equal(full.images[mask], test.images)
    np.testing.assert_array_equal(full.images[~mask], train.images)


def test_digits_match_sklearn_loader():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    full = data.get_dataset("digits", "all")
    np.testing.assert_array_equal(full.images[..., 0], (bunch.images / 8 - 1).astype(np.float32))
    np.testing.assert_array_equal(full.labels, bunch.target)


def test_unknown_names_and_splits():
    with pytest.raises(ValueError, match="unknown dataset"):
        data.get_dataset("cifar10")
    with pytest.raises(ValueError, match="digits split"):
        data.get_dataset("digits", "validation")


# ----------------------------------------------------------------------------------------------- pipeline
def _tiny_source(count=13, size=4):
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (count, size, size, 1)).astype(np.float32)
    return data.ArraySource(images, (np.arange(count) % 3).astype(np.int32), 3, "tiny")


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def _assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
        np.testing.assert_array_equal(np.asarray(a["label"]), np.asarray(b["label"]))


def test_epochs_cover_every_example_once_and_reshuffle():
    state = data.initial_state(seed=3, num_examples=13)
    epochs = {0: [], 1: []}
    while state["epoch"] < 2:
        indices, _, next_state = data.plan_batch(state, batch_size=5, drop_remainder=False)
        epochs[state["epoch"]].append(indices)
        state = next_state
    for epoch, parts in epochs.items():
        assert [len(p) for p in parts] == [5, 5, 3]
        np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(13))
    assert not np.array_equal(np.concatenate(epochs[0]), np.concatenate(epochs[1]))
    # drop_remainder: 2 full batches per epoch, then the next epoch starts.
    state = data.initial_state(seed=3, num_examples=13)
    _, _, state = data.plan_batch(state, batch_size=5)
    _, _, state = data.plan_batch(state, batch_size=5)
    assert state == {"seed": 3, "epoch": 1, "position": 0, "num_examples": 13}


def test_deterministic_per_seed():
    source = _tiny_source()
    run = lambda seed: _take(data.BatchIterator(source, 4, seed=seed, random_flip=True), 7)  # noqa: E731
    _assert_same_batches(run(1), run(1))
    different = [np.array_equal(a["image"], b["image"]) for a, b in zip(run(1), run(2))]
    assert not all(different)
    unshuffled = next(data.BatchIterator(source, 4, shuffle=False))
    np.testing.assert_array_equal(unshuffled["image"], source.images[:4])


def test_resume_from_saved_state_is_bit_identical():
    source = _tiny_source()
    options = dict(seed=7, random_flip=True)
    uninterrupted = _take(data.BatchIterator(source, 4, **options), 10)  # 3 batches/epoch: crosses 3 epochs
    for k in (0, 2, 3, 5):
        first = data.BatchIterator(source, 4, **options)
        head = _take(first, k)
        saved = json.loads(json.dumps(first.get_state()))  # what a checkpoint would hold
        resumed = data.BatchIterator(source, 4, seed=123, random_flip=True, state=saved)  # state wins
        _assert_same_batches(head + _take(resumed, 10 - k), uninterrupted)


def test_flip_mirrors_width_axis():
    source = _tiny_source(count=64)
    plain = next(data.BatchIterator(source, 64, seed=0))
    flipped = next(data.BatchIterator(source, 64, seed=0, random_flip=True))
    same = np.all(plain["image"] == flipped["image"], axis=(1, 2, 3))
    mirrored = np.all(plain["image"][:, :, ::-1] == flipped["image"], axis=(1, 2, 3))
    assert np.all(same | mirrored) and 10 < mirrored.sum() < 54


def test_num_epochs_and_bad_arguments():
    source = _tiny_source()
    assert len(list(data.BatchIterator(source, 4, num_epochs=2))) == 6
    assert [len(b["label"]) for b in data.BatchIterator(source, 4, num_epochs=1, drop_remainder=False)] == \
        [4, 4, 4, 1]
    with pytest.raises(ValueError, match="lacks"):
        data.BatchIterator(source, 4, state={"seed": 0, "epoch": 0})
    with pytest.raises(ValueError, match="13 examples but the dataset now has 12"):
        data.BatchIterator(_tiny_source(count=12), 4, state=data.initial_state(0, 13))
    with pytest.raises(ValueError, match="batch_size"):
        data.BatchIterator(source, 20)


@pytest.mark.parametrize("num_devices", [1, 8])
def test_sharded_global_batches(num_devices):
    assert len(jax.devices()) >= num_devices, "conftest should simulate 8 CPU devices"
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:num_devices]), ("data",))
    source = data.get_dataset("digits", "test")
    sharded = _take(data.BatchIterator(source, 16, seed=5, mesh=mesh, random_flip=True), 3)
    host = _take(data.BatchIterator(source, 16, seed=5, random_flip=True), 3)
    for batch in sharded:
        assert batch["image"].shape == (16, 8, 8, 1) and batch["image"].dtype == np.float32
        assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
        for value in batch.values():
            assert value.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), value.ndim)
            assert {s.data.shape[0] for s in value.addressable_shards} == {16 // num_devices}
    _assert_same_batches(sharded, host)


def test_sharding_on_2d_mesh_and_divisibility():
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    batch = next(data.BatchIterator(_tiny_source(count=16), 8, seed=0, mesh=mesh))
    assert batch["image"].shape == (8, 4, 4, 1)
    assert len(batch["image"].addressable_shards) == 8  # 4 row blocks, each replicated on 2 model devices
    assert {s.data.shape[0] for s in batch["image"].addressable_shards} == {2}
    with pytest.raises(ValueError, match="not divisible"):
        data.BatchIterator(_tiny_source(count=16), 6, mesh=mesh)
    with pytest.raises(ValueError, match="not in the mesh"):
        data.BatchIterator(_tiny_source(count=16), 8, mesh=mesh, data_axis="batch")


# ----------------------------------------------------------------------------------------------- idx files
def _idx_bytes(array, type_code):
    big_endian = array.astype(array.dtype.newbyteorder(">"))
    return bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + \
        big_endian.tobytes()


def _write_mnist_dir(folder, prefix, images, labels, compress=True):
    for stem, array, code in ((f"{prefix}-images-idx3-ubyte", images, 0x08),
                              (f"{prefix}-labels-idx1-ubyte", labels, 0x08)):
        raw = _idx_bytes(array, code)
        if compress:
            with gzip.open(os.path.join(folder, stem + ".gz"), "wb") as handle:
                handle.write(raw)
        else:
            with open(os.path.join(folder, stem), "wb") as handle:
                handle.write(raw)


def test_idx_parsing_on_tiny_files(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 3, 5), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2], np.uint8)
    _write_mnist_dir(tmp_path, "train", images, labels)
    _write_mnist_dir(tmp_path, "t10k", images[:2], labels[:2], compress=False)
    np.testing.assert_array_equal(data.read_idx(str(tmp_path / "train-images-idx3-ubyte.gz")), images)
    train = data.get_dataset(f"idx:{tmp_path}", "train")
    assert train.image_shape == (3, 5, 1) and train.num_classes == 3
    np.testing.assert_array_equal(train.images[..., 0], images.astype(np.float32) / 127.5 - 1)
    np.testing.assert_array_equal(train.labels, labels)
    assert len(data.get_dataset(f"idx:{tmp_path}", "test")) == 2
    # Other element types are big-endian on disk.
    floats = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5
    np.testing.assert_array_equal(idx_lib.parse_idx(_idx_bytes(floats, 0x0D)), floats)
    ints = np.array([-70000, 5, 70000], np.int32)
    np.testing.assert_array_equal(idx_lib.parse_idx(_idx_bytes(ints, 0x0C)), ints)


def test_idx_corrupt_files_name_the_path(tmp_path):
    truncated = tmp_path / "train-images-idx3-ubyte"
    truncated.write_bytes(_idx_bytes(np.zeros((2, 2, 2), np.uint8), 0x08)[:-1])
    with pytest.raises(ValueError, match=f"{truncated}.*size mismatch"):
        data.read_idx(str(truncated))
    not_idx = tmp_path / "junk.gz"
    not_idx.write_bytes(gzip.compress(b"hello world"))
    with pytest.raises(ValueError, match=f"{not_idx}: not an idx file"):
        data.read_idx(str(not_idx))
    broken_gzip = tmp_path / "broken.gz"
    broken_gzip.write_bytes(gzip.compress(b"\x00" * 100)[:20])
    with pytest.raises(ValueError, match=f"{broken_gzip}: corrupt gzip"):
        data.read_idx(str(broken_gzip))


def test_missing_fashion_mnist_names_path_and_install_command(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        data.get_dataset("fashion_mnist", "train", data_dir=str(tmp_path))
    message = str(info.value)
    assert str(tmp_path / "train-images-idx3-ubyte.gz") in message
    assert "apt-get install dataset-fashion-mnist" in message


def _write_debian_style_fashion_mnist(folder, counts):
    """Fashion-MNIST's four idx files for ``counts`` = {prefix: N} images, gzipped the way Debian's
    dataset-fashion-mnist package re-gzipped them (no file name in the gzip header, mtime 0)."""
    rng = np.random.default_rng(0)
    written = {}
    for prefix, count in counts.items():
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        images[0, 0, :2] = (0, 255)  # both ends of the pixel range
        labels = (np.arange(count) % 10).astype(np.uint8)
        for stem, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            with open(os.path.join(folder, stem + ".gz"), "wb") as raw:
                with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as handle:
                    handle.write(_idx_bytes(array, 0x08))
        written[prefix] = (images, labels)
    return written


def test_fashion_mnist_loader_on_a_generated_idx_fixture(tmp_path):
    """The fashion_mnist loader end to end on a few generated images in the Debian layout, so the loader is
    tested on every machine (the real files are an optional extra below)."""
    written = _write_debian_style_fashion_mnist(tmp_path, {"train": 20, "t10k": 10})
    with open(tmp_path / "train-images-idx3-ubyte.gz", "rb") as f:
        header = f.read(10)
    assert header[:2] == b"\x1f\x8b" and not header[3] & 0x08  # gzip without FNAME, as Debian ships them
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = written[prefix]
        source = data.get_dataset("fashion_mnist", split, data_dir=str(tmp_path))
        assert len(source) == len(images) and source.image_shape == (28, 28, 1) and source.num_classes == 10
        assert source.class_names == idx_lib.FASHION_MNIST_CLASSES and source.class_names[9] == "Ankle boot"
        assert source.images.dtype == np.float32 and source.labels.dtype == np.int32
        np.testing.assert_array_equal(source.images[..., 0], images.astype(np.float32) / 127.5 - 1)
        np.testing.assert_array_equal(source.labels, labels)
        assert source.images.min() == -1.0 and source.images.max() == 1.0
    alias = data.get_dataset("fashion-mnist", "train", data_dir=str(tmp_path))
    np.testing.assert_array_equal(alias.images, data.load_fashion_mnist("train", data_dir=str(tmp_path)).images)
    batch = next(data.BatchIterator(alias, 8, seed=0))
    assert batch["image"].shape == (8, 28, 28, 1) and batch["label"].shape == (8,)
    with pytest.raises(ValueError, match="fashion_mnist split"):
        data.get_dataset("fashion_mnist", "validation", data_dir=str(tmp_path))


@pytest.mark.skipif(not os.path.isdir(FASHION_DIR),
                    reason=f"optional extra: {FASHION_DIR} absent (`apt-get install -y dataset-fashion-mnist`); "
                           "test_fashion_mnist_loader_on_a_generated_idx_fixture covers the loader")
def test_real_fashion_mnist():
    for split, count in (("train", 60000), ("test", 10000)):
        source = data.get_dataset("fashion_mnist", split)
        assert len(source) == count and source.image_shape == (28, 28, 1)
        np.testing.assert_array_equal(np.bincount(source.labels, minlength=10), [count // 10] * 10)
        assert source.images.min() == -1.0 and source.images.max() == 1.0
    # Published Fashion-MNIST train mean 0.2860 of 255 (Zalando README / torchvision normalisation constants).
    train = data.get_dataset("fashion_mnist", "train")
    mean_gray = float((train.images.mean(dtype=np.float64) + 1) / 2)
    assert abs(mean_gray - 0.2860) < 5e-4


# ----------------------------------------------------------------------------------------------- TFDS
def test_importing_dpmjax_data_imports_no_tensorflow():
    code = ("import sys, dpmjax, dpmjax.data; "
            "bad = [m for m in ('tensorflow', 'tensorflow_datasets', 'sklearn') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_tfds_data_source_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12):
        source = data.get_dataset("tfds:mnist", "train", backend="data_source")
        assert len(source) == 12 and source.image_shape == (28, 28, 1) and source.num_classes == 10
        batch = next(data.BatchIterator(source, 8, seed=0))
        assert batch["image"].shape == (8, 28, 28, 1) and batch["image"].dtype == np.float32
        assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
        assert batch["label"].dtype == np.int32 and np.all((batch["label"] >= 0) & (batch["label"] < 10))
        again = next(data.BatchIterator(source, 8, seed=0))
        np.testing.assert_array_equal(batch["image"], again["image"])
        resized = data.get_dataset("tfds:cifar10", "test", backend="data_source", image_size=16)
        assert resized.image_shape == (16, 16, 3)
        assert resized.get_batch(np.array([0, 1]))["image"].shape == (2, 16, 16, 3)


def test_tfds_missing_data_says_how_to_prepare_it(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    if data.tfds_source.tensorflow_available():
        pytest.skip("with TensorFlow, backend='auto' falls back to tfds.load")
    with pytest.raises(RuntimeError, match="array_record.*pip install dpmjax\\[tf\\]"):
        data.get_dataset("tfds:mnist", "train", data_dir=str(tmp_path), download=False)


def test_tfds_load_with_mock_data():
    pytest.importorskip("tensorflow", reason="tfds.load needs TensorFlow (the tf extra)")
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=6):
        source = data.get_dataset("tfds:mnist", "train", backend="load")
        assert len(source) == 6 and source.image_shape == (28, 28, 1)


# ----------------------------------------------------------------------------------------------- folder
def _write_png(path, array):
    from PIL import Image

    Image.fromarray(array).save(path)


def test_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    pixels = {}
    for class_name, count in (("cat", 2), ("dog", 3)):
        (tmp_path / "train" / class_name).mkdir(parents=True)
        for i in range(count):
            pixels[(class_name, i)] = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
            _write_png(tmp_path / "train" / class_name / f"{i}.png", pixels[(class_name, i)])
    source = data.get_dataset(f"folder:{tmp_path}", "train")
    assert len(source) == 5 and source.image_shape == (6, 6, 3) and source.class_names == ("cat", "dog")
    batch = source.get_batch(np.arange(5))
    np.testing.assert_array_equal(batch["label"], [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(batch["image"][2], pixels[("dog", 0)].astype(np.float32) / 127.5 - 1)
    assert batch["image"].dtype == np.float32
    everything = next(data.BatchIterator(source, 5, seed=0, shuffle=False))
    np.testing.assert_array_equal(everything["image"], batch["image"])
    # Grayscale + resize; an in-memory copy gives the same numbers.
    small = data.get_dataset(f"folder:{tmp_path}", "train", channels=1, image_size=4)
    cached = data.get_dataset(f"folder:{tmp_path}", "train", channels=1, image_size=4, in_memory=True)
    assert small.image_shape == (4, 4, 1)
    np.testing.assert_array_equal(small.get_batch(np.arange(5))["image"], cached.get_batch(np.arange(5))["image"])
    with pytest.raises(FileNotFoundError, match="no sub-folder 'test'"):
        data.get_dataset(f"folder:{tmp_path}", "test")


def test_image_folder_flat_and_mismatched_sizes(tmp_path):
    _write_png(tmp_path / "a.png", np.zeros((4, 4, 3), np.uint8))
    _write_png(tmp_path / "b.png", np.full((5, 4, 3), 255, np.uint8))
    source = data.ImageFolderSource(str(tmp_path))
    assert source.num_classes is None and source.image_shape == (4, 4, 3)
    with pytest.raises(ValueError, match="b.png.*pass image_size="):
        source.get_batch(np.array([0, 1]))
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        data.ImageFolderSource(str(tmp_path / "missing"))
