"""Convert a diffusers ``UNet2DModel`` folder (weights + scheduler config) into a dpmjax checkpoint folder.

    dpmjax convert --from-diffusers ddpm-cifar10-32 --out runs/ddpm_cifar10
    model_fn, schedule, config = dpmjax.workdir.load_for_sampling("runs/ddpm_cifar10")
    x0 = dpmjax.sample(model_fn, x_T, schedule=schedule, solver="dpmpp_2m", nfe=10,
                       prediction=config.train.target)

Input: a pipeline folder (``model_index.json``, ``unet/``, ``scheduler/``) or a model folder (``config.json`` +
``diffusion_pytorch_model.safetensors`` or ``.bin``, with ``scheduler_config.json`` beside it or in
``../scheduler/``). safetensors files are read with ``safetensors.numpy`` (no torch); ``.bin`` files with
``dpmjax.metrics.weights.read_torch_file``, whose unpickler admits only tensor-rebuild functions, so a file
that would run code raises ``UnsafeCheckpointError`` (torch is not needed either).

Output: ``config.json`` (a dpmjax config: model kind ``diffusers_unet`` with the UNet config, the
scheduler's betas as the schedule, the prediction type as ``train.target``) and ``checkpoints/0`` (orbax:
``{"params": ...}``), loaded by ``load_for_sampling`` like a training workdir. Everything is written to a
temporary sibling folder that is renamed into place at the end, so a failure leaves nothing behind.

Scheduler mapping: ``trained_betas`` or ``beta_schedule`` (linear, scaled_linear, squaredcos_cap_v2) with
``beta_start``, ``beta_end``, ``num_train_timesteps`` give the betas exactly as diffusers computes them
(``dpmjax.schedules.betas_for_name``); ``prediction_type`` epsilon / v_prediction / sample becomes eps / v / x0.
The network gets diffusers' timestep k = N t - 1 for dpmjax time t = (k + 1) / N (``DiffusersUNet2D``'s
``timestep_scale``; DPM-Solver's discrete-time convention).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from dpmjax import schedules
from dpmjax.nn.diffusers_unet import DiffusersUNet2D, UnsupportedConfigError, normalize_config

__all__ = ["ConversionError", "UnsupportedConfigError", "find_diffusers_files", "read_state_dict",
           "schedule_from_diffusers", "check_finite", "convert_unet_params", "convert_diffusers", "CONVERTED_FORMAT"]

CONVERTED_FORMAT = "diffusers-UNet2DModel/1"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
# Scheduler options that change the noise schedule itself and have no dpmjax counterpart.
_SCHEDULE_CHANGING = {"rescale_betas_zero_snr": False, "use_karras_sigmas": False, "use_exponential_sigmas": False,
                      "use_beta_sigmas": False, "use_flow_sigmas": False}


class ConversionError(ValueError):
    """The folder or its weights cannot be converted (missing files, missing / unexpected / misshapen tensors)."""


# ------------------------------------------------------------------------------------------------ inputs

def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ConversionError(f"cannot read {path}: {err}") from err
    if not isinstance(data, dict):
        raise ConversionError(f"{path} does not hold a JSON object")
    return data


def find_diffusers_files(folder: str) -> tuple[str, str, str | None]:
    """(UNet config.json, weights file, scheduler_config.json or None) of a pipeline or model folder."""
    folder = os.path.abspath(folder)
    if not os.path.isdir(folder):
        raise ConversionError(f"{folder} is not a folder")
    unet_dir = os.path.join(folder, "unet") if os.path.isfile(os.path.join(folder, "unet", "config.json")) else folder
    config = os.path.join(unet_dir, "config.json")
    if not os.path.isfile(config):
        raise ConversionError(f"{folder} holds no config.json (nor unet/config.json): not a diffusers model folder")
    sharded = [n for n in os.listdir(unet_dir) if n.endswith(".index.json")]
    weights = next((os.path.join(unet_dir, n) for n in WEIGHT_FILES if os.path.isfile(os.path.join(unet_dir, n))),
                   None)
    if weights is None:
        hint = f" (sharded checkpoints such as {sharded[0]} are not supported)" if sharded else ""
        raise ConversionError(f"{unet_dir} holds neither of {list(WEIGHT_FILES)}{hint}; found "
                              f"{sorted(os.listdir(unet_dir))}")
    candidates = [os.path.join(folder, "scheduler", "scheduler_config.json"),
                  os.path.join(unet_dir, "scheduler_config.json"),
                  os.path.join(os.path.dirname(unet_dir), "scheduler", "scheduler_config.json")]
    scheduler = next((p for p in candidates if os.path.isfile(p)), None)
    return config, weights, scheduler


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """Tensors of a diffusers weight file as numpy arrays, never running code from the file."""
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file
        try:
            state = load_file(path)
        except (SafetensorError, OSError, ValueError) as err:
            raise ConversionError(f"cannot read {path}: {err}") from err
    else:
        from dpmjax.metrics.weights import WeightsError, read_torch_file
        try:
            state = read_torch_file(path)  # UnsafeCheckpointError (code in the pickle) propagates as is
        except WeightsError as err:
            raise ConversionError(f"cannot read {path}: {err}") from err
    if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise ConversionError(f"{path} is not a flat state dict of tensors")
    return {str(k): v for k, v in state.items()}


def schedule_from_diffusers(scheduler_config: dict) -> tuple[schedules.DiscreteVP, str, np.ndarray]:
    """(DiscreteVP, prediction, betas [N] float64) from a diffusers scheduler config dict.

    Defaults are DDPMScheduler's (linear 1e-4..0.02, 1000 steps, epsilon). Options that change the noise
    schedule itself (zero-terminal-SNR rescaling, Karras/exponential/beta/flow sigmas) or unknown beta
    schedules raise ``UnsupportedConfigError`` naming them. Sampling-only options (clip_sample,
    timestep_spacing, thresholding, ...) are not part of the schedule and are ignored.
    """
    c = scheduler_config
    n = c.get("num_train_timesteps", 1000)
    set_options = [k for k, off in _SCHEDULE_CHANGING.items() if c.get(k, off) not in (off, None)]
    if set_options:
        raise UnsupportedConfigError(f"scheduler options {set_options} change the noise schedule; dpmjax's "
                                     "DiscreteVP does not support them")
    if "sigma_min" in c and "beta_schedule" not in c:
        raise UnsupportedConfigError(f"scheduler {c.get('_class_name')!r} is not a variance-preserving (betas) "
                                     "schedule")
    if c.get("trained_betas") is not None:
        betas = np.asarray(c["trained_betas"], np.float32).astype(np.float64)
        if betas.ndim != 1 or betas.shape[0] != n:
            raise ConversionError(f"trained_betas has shape {betas.shape}, expected [{n}] (num_train_timesteps)")
    else:
        name = c.get("beta_schedule", "linear")
        if name not in _BETA_SCHEDULES:
            raise UnsupportedConfigError(f"beta_schedule={name!r} (supported: {sorted(_BETA_SCHEDULES)}, or "
                                         "trained_betas)")
        betas = schedules.betas_for_name(_BETA_SCHEDULES[name], int(n), float(c.get("beta_start", 1e-4)),
                                         float(c.get("beta_end", 0.02)))
    prediction_type = c.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise UnsupportedConfigError(f"prediction_type={prediction_type!r} (supported: {sorted(PREDICTION_TYPES)})")
    variance_type = c.get("variance_type")
    if variance_type in ("learned", "learned_range"):
        raise UnsupportedConfigError(f"variance_type={variance_type!r}: a UNet that also predicts variances "
                                     "(2x output channels) is not supported")
    return schedules.DiscreteVP.from_betas(betas), PREDICTION_TYPES[prediction_type], betas


# ------------------------------------------------------------------------------------------------ weights

def _flax_path(torch_key: str) -> tuple[str, ...]:
    """``down_blocks.1.attentions.0.to_out.0.weight`` -> (down_blocks_1, attentions_0, to_out_0, weight)."""
    parts: list[str] = []
    for token in torch_key.split("."):
        if token.isdigit() and parts:
            parts[-1] = f"{parts[-1]}_{token}"
        else:
            parts.append(token)
    return tuple(parts)


# diffusers < 0.14 named the attention projections query / key / value / proj_attn (ModelMixin renames them
# on load: ``_fix_state_dict_keys_on_load``); safetensors copies of old checkpoints keep the old names.
_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out_0"}


def _rename_deprecated(path: tuple[str, ...]) -> tuple[str, ...]:
    if len(path) >= 3 and path[-3].startswith("attentions_") and path[-2] in _DEPRECATED_ATTENTION:
        return path[:-2] + (_DEPRECATED_ATTENTION[path[-2]], path[-1])
    return path


def _flatten(tree, prefix=()) -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def _unflatten(flat: dict) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def abstract_params(model: DiffusersUNet2D, image_shape) -> dict:
    """The model's parameter shapes ({"params": ...} of ShapeDtypeStructs), computed without running it."""
    x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x, jnp.zeros((1,), jnp.float32)))


def check_finite(state_dict: dict[str, np.ndarray], source: str = "the checkpoint") -> None:
    """Raise ``ConversionError`` naming every floating tensor of ``state_dict`` that holds NaN or inf.

    A converted folder with NaN weights used to sample all-NaN images with exit status 0 (issue 12); damaged
    or diverged downloads are refused here instead, before anything is written.
    """
    bad = []
    for key, tensor in state_dict.items():
        array = np.asarray(tensor)
        if array.dtype.kind != "f" and array.dtype.name != "bfloat16":
            continue
        values = array.astype(np.float32)
        finite = np.isfinite(values)
        if not finite.all():
            bad.append(f"{key} ({int(np.isnan(values).sum())} NaN, {int(np.isinf(values).sum())} inf of "
                       f"{values.size} values)")
    if bad:
        shown = "; ".join(bad[:10]) + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise ConversionError(f"{source} holds non-finite weights in {len(bad)} tensor(s): {shown}. Refusing to "
                              "convert (the model would only produce NaN); re-download or re-export the weights")


def convert_unet_params(state_dict: dict[str, np.ndarray], model: DiffusersUNet2D, image_shape) -> dict:
    """Map a UNet2DModel state dict onto ``model``'s parameters: ``{"params": ...}`` of float32 numpy arrays.

    Conv weights OIHW -> HWIO, linear weights [out, in] -> [in, out], GroupNorm weight -> scale. Every
    missing, unexpected or misshapen tensor is named in one ``ConversionError``; so is every tensor holding
    NaN or inf (``check_finite``).
    """
    check_finite(state_dict)
    template = _flatten(abstract_params(model, image_shape)["params"])
    by_module = {path[:-1]: {} for path in template}
    for path, spec in template.items():
        by_module[path[:-1]][path[-1]] = spec
    converted, unexpected, mismatched = {}, [], []
    for key, tensor in state_dict.items():
        path = _rename_deprecated(_flax_path(key))
        module, leaf = path[:-1], path[-1]
        specs = by_module.get(module, {})
        target = {"weight": "kernel" if "kernel" in specs else "scale", "bias": "bias"}.get(leaf)
        if target not in specs:
            unexpected.append(key)
            continue
        array = np.asarray(tensor, np.float32)
        if target == "kernel" and array.ndim == 4:
            array = array.transpose(2, 3, 1, 0)
        elif target == "kernel" and array.ndim == 2:
            array = array.T
        expected = tuple(specs[target].shape)
        if array.shape != expected:
            torch_shape = tuple(np.shape(tensor))
            mismatched.append(f"{key}: checkpoint {torch_shape} -> {array.shape}, model expects {expected}")
            continue
        converted[module + (target,)] = np.ascontiguousarray(array)
    missing = sorted("/".join(p) for p in template if p not in converted)
    if missing or unexpected or mismatched:
        lines = []
        if mismatched:
            lines.append(f"shape mismatches ({len(mismatched)}): " + "; ".join(mismatched[:10]))
        if missing:
            lines.append(f"parameters missing from the checkpoint ({len(missing)}): {missing[:10]}")
        if unexpected:
            lines.append(f"checkpoint tensors the model does not have ({len(unexpected)}): {sorted(unexpected)[:10]}")
        raise ConversionError("the weights do not match the UNet built from config.json: " + " | ".join(lines))
    return {"params": _unflatten(converted)}


# ------------------------------------------------------------------------------------------------ writing

def _image_shape(unet_fields: dict, image_size) -> tuple[int, int, int]:
    size = image_size if image_size is not None else unet_fields["sample_size"]
    if size is None:
        raise ConversionError("config.json has no sample_size; pass image_size= (--image-size)")
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return int(height), int(width), unet_fields["in_channels"]


def convert_diffusers(src: str, out: str, *, scheduler_config: str | dict | None = None, image_size=None,
                      overwrite: bool = False, log=print) -> str:
    """Convert a diffusers UNet2DModel folder ``src`` into a dpmjax checkpoint folder ``out`` (returned).

    Args:
      src: pipeline folder (``unet/``, ``scheduler/``) or model folder (``config.json`` + weights).
      out: the folder to create; it must not exist unless ``overwrite``.
      scheduler_config: a scheduler_config.json path or dict; default: found beside the UNet, else
        DDPMScheduler's defaults (linear betas 1e-4..0.02, 1000 steps, epsilon), with a logged note.
      image_size: sample size when config.json has none (int or (H, W)).
    Raises:
      ConversionError, UnsupportedConfigError (both ValueError), UnsafeCheckpointError for a .bin with code.
    """
    from dpmjax.train import checkpoint

    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise ConversionError(f"{out} already exists (pass overwrite=True / --overwrite to replace it)")
    config_path, weights_path, found_scheduler = find_diffusers_files(src)
    unet_config = _read_json(config_path)
    if "_class_name" not in unet_config:
        raise ConversionError(f"{config_path} has no _class_name: not a diffusers model config")
    fields = normalize_config(unet_config)
    if isinstance(scheduler_config, dict):
        sched_config, sched_source = scheduler_config, "given"
    else:
        sched_path = scheduler_config or found_scheduler
        sched_config = _read_json(sched_path) if sched_path else {}
        sched_source = sched_path or "DDPMScheduler defaults (no scheduler_config.json found)"
        if not sched_path:
            log("note: no scheduler_config.json found; using DDPMScheduler's defaults (linear betas 1e-4..0.02, "
                "1000 steps, epsilon prediction). Pass --scheduler-config to override.")
    schedule, prediction, betas = schedule_from_diffusers(sched_config)
    num_steps = schedule.num_train_timesteps
    image_shape = _image_shape(fields, image_size)
    model = DiffusersUNet2D(**fields, timestep_scale=num_steps / 1000.0)
    state_dict = read_state_dict(weights_path)
    check_finite(state_dict, weights_path)
    params = convert_unet_params(state_dict, model, image_shape)

    config = {
        "seed": 0,
        "schedule": {"name": "diffusers", "num_train_timesteps": num_steps, "betas": [float(b) for b in betas]},
        "model": {"kind": "diffusers_unet", **{k: (list(v) if isinstance(v, tuple) else v) for k, v in
                                               fields.items()}, "timestep_scale": num_steps / 1000.0},
        "data": {"image_shape": list(image_shape)},
        "train": {"target": prediction},
        "pretrained": {"format": CONVERTED_FORMAT, "source": os.path.abspath(src),
                       "weights_file": os.path.basename(weights_path), "scheduler_config_source": sched_source,
                       "unet_config": unet_config, "scheduler_config": sched_config},
    }
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        mngr = checkpoint.manager(tmp, max_to_keep=1)
        try:
            checkpoint.save(mngr, 0, params, {"format": CONVERTED_FORMAT, "source": os.path.abspath(src)})
        finally:
            mngr.close()
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        if os.path.exists(out):  # overwrite: move the old folder aside only once the new one is complete
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
            os.rename(out, os.path.join(old, "previous"))
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
    log(f"converted {weights_path} ({count:,} parameters, {prediction}-prediction, {num_steps} steps) -> {out}")
    return out
