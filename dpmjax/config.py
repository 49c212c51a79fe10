"""Configs: Python files returning a locked ``ml_collections.ConfigDict``, with ``--config.a.b=value`` overrides.

    config = load_config("configs/digits.py")                       # or "digits.py" (looked up in configs/)
    config = load_config("configs/digits.py:cond,runlocal")         # variants, parsed by parse_arg
    config = load_config("configs/digits.py", ["--config.train.num_steps=100", "--config.sample.nfe", "8"])

A bare file name is looked up in the repository's ``configs/`` folder. The CLI, experiments and tests load
configs only through this module.

Config files share their defaults through ``configs/common.py``: a config imports it with ``from . import
common`` (the file is loaded as a member of a package whose folder is the config's folder, so a config copied
elsewhere needs a ``common.py`` beside it; nothing is added to ``sys.path``).

Overrides keep the type of the field they replace (an int field takes ints only, ``1.5`` and ``abc`` are
errors; a float field also takes ints; a tuple field takes a list or tuple, ``1,2`` or ``(1, 2)``; a bool field
``true``/``false``/``1``/``0``; a string field any text; ``None`` only where ``NULLABLE`` allows it, e.g.
``--config.model.num_classes=None``). ``--config.a.b value`` (two arguments) works too.
Every error is a ``ConfigError`` (a ``ValueError``) whose message starts with the flag it is about, raised
before anything is built; ``validate_config`` then checks the values the library reads (positive step
counts, known solver / spacing / sharding names, ...).
"""
from __future__ import annotations

import ast
import difflib
import hashlib
import importlib.util
import numbers
import os
import sys
import types

__all__ = ["ConfigError", "NULLABLE", "configs_dir", "parse_arg", "load_config", "apply_overrides", "validate_config"]


class ConfigError(ValueError):
    """A mistake in a config spec, an override or a config value; the message names the flag or field."""


def configs_dir() -> str:
    """The shipped configs: the repository's ``configs/`` folder beside the ``dpmjax`` package (a checkout or an
    editable install), else the copy a regular install puts in ``dpmjax/_configs`` (setup.py)."""
    here = os.path.dirname(os.path.abspath(__file__))
    repository = os.path.join(os.path.dirname(here), "configs")
    return repository if os.path.isdir(repository) else os.path.join(here, "_configs")


def _resolve(path: str) -> str:
    """A config path as given, else the shipped config it names: ``configs/methods/x.py`` (the repository's
    spelling, in the docs) or a bare ``digits.py``, read from ``configs_dir()``."""
    if not os.path.exists(path):
        parts = path.replace(os.sep, "/").split("/")
        inside = "/".join(parts[len(parts) - parts[::-1].index("configs"):]) if "configs" in parts else ""
        for candidate in (inside, os.path.basename(path)):
            if candidate and os.path.exists(os.path.join(configs_dir(), candidate)):
                path = os.path.join(configs_dir(), candidate)
                break
    if not os.path.isfile(path):
        folder = configs_dir()
        known = sorted(n for n in os.listdir(folder) if n.endswith(".py")) if os.path.isdir(folder) else []
        raise ConfigError(f"--config: no config file {path!r} (shipped configs in {folder}: {known})")
    return os.path.abspath(path)


def _load_module(path: str) -> types.ModuleType:
    """Execute a config file as ``<package>.<stem>``, the package being its folder (for ``from . import common``)."""
    folder = os.path.dirname(path)
    package = "dpmjax_configs_" + hashlib.sha1(folder.encode()).hexdigest()[:12]
    if package not in sys.modules:
        parent = types.ModuleType(package, f"configs folder {folder}")
        parent.__path__ = [folder]
        parent.__package__ = package
        sys.modules[package] = parent
    name = f"{package}.{os.path.splitext(os.path.basename(path))[0]}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # fresh on every load: an edited config file is read again
    spec.loader.exec_module(module)
    return module


def parse_arg(arg, **spec):
    """``"a,b=3"`` -> ConfigDict(a=True, b=3, <other names of spec at their defaults>).

    Args:
      arg: the variant string after ``:`` (None or "" for none).
      spec: every accepted name with its default; a bare name needs a bool default, ``name=value`` is parsed
        to the default's type (bool: true/false/1/0; int; float; str).
    Raises:
      ValueError naming the item and the accepted names.
    """
    import ml_collections

    result = ml_collections.ConfigDict(dict(spec))
    for item in (arg or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, has_value, text = item.partition("=")
        if name not in spec:
            raise ValueError(f"unknown variant {name!r}; this config accepts {sorted(spec)}")
        default = spec[name]
        if not has_value:
            if not isinstance(default, bool):
                raise ValueError(f"variant {name!r} needs a value ({name}=..., default {default!r})")
            result[name] = True
        elif isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"variant {item!r}: expected true or false")
            result[name] = text.lower() in ("true", "1")
        else:
            try:
                result[name] = type(default)(text)
            except ValueError:
                raise ValueError(f"variant {item!r}: expected a {type(default).__name__}") from None
    return result


def load_config(spec: str, overrides=()):
    """``path/to/config.py[:arg]`` -> locked ConfigDict, with ``--config.key=value`` overrides applied and the
    result checked by ``validate_config``. Raises ``ConfigError`` naming the flag on any mistake."""
    path, _, arg = spec.partition(":")
    path = _resolve(path)
    module = _load_module(path)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--config: {path} defines no get_config(arg=None)")
    try:
        config = module.get_config(arg or None)
    except ValueError as err:  # unknown variants and parse_arg errors
        raise ConfigError(f"--config {spec}: {err}") from err
    config = apply_overrides(config, overrides)
    validate_config(config)
    return config


# ------------------------------------------------------------------------------------------------- overrides

def _pairs(overrides):
    """``--config.a.b=v`` and ``--config.a.b v`` items -> [(flag, "a.b", "v")]."""
    items, pairs, i = list(overrides), [], 0
    while i < len(items):
        item = items[i]
        if not item.startswith("--config.") or item == "--config.":
            raise ConfigError(f"unrecognised argument {item!r} (config overrides look like "
                              "--config.train.num_steps=100)")
        if "=" in item:
            flag, _, text = item.partition("=")
        elif i + 1 < len(items) and not items[i + 1].startswith("--"):
            flag, text = item, items[i + 1]
            i += 1
        else:
            raise ConfigError(f"{item}: no value (write {item}=VALUE)")
        pairs.append((flag, flag[len("--config."):], text))
        i += 1
    return pairs


def _literal(text: str):
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return _NOT_A_LITERAL


_NOT_A_LITERAL = object()
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# Fields that may be switched off with ``None`` although their default is a value (an unconditional model,
# no gradient clipping); every other field keeps its default's type.
NULLABLE = ("model.num_classes", "optim.grad_clip")


def _coerce(flag: str, current, text: str):
    """``text`` as a value of ``current``'s type (int -> float allowed, list -> tuple), else ConfigError."""
    shown = f"{flag}={text}"
    if hasattr(current, "keys"):
        raise ConfigError(f"{shown}: {flag[2:]} is a section, not a value; set its fields "
                          f"(e.g. {flag}.{next(iter(current.keys()), 'field')}=...)")
    value = _literal(text)
    if value is None and text.strip() == "None" and flag[len("--config."):] in NULLABLE:
        return None
    if isinstance(current, bool):
        if text.strip().lower() in _TRUE:
            return True
        if text.strip().lower() in _FALSE:
            return False
        raise ConfigError(f"{shown}: expected true or false (the default is {current})")
    if _is_int(current):
        if not _is_int(value):
            raise ConfigError(f"{shown}: expected an integer (the default is {current})")
        return int(value)
    if _is_real(current):
        if not _is_real(value):
            try:
                value = float(text)  # inf, nan
            except ValueError:
                raise ConfigError(f"{shown}: expected a number (the default is {current})") from None
        return float(value)
    if isinstance(current, str):
        return value if isinstance(value, str) else text
    if isinstance(current, (tuple, list)):
        if not isinstance(value, (tuple, list)):
            raise ConfigError(f"{shown}: expected a list such as {list(current) or [1, 2]} (the default is "
                              f"{tuple(current)}); write one element as [x]")
        kinds = {type(v) for v in current}
        if len(kinds) == 1:  # a homogeneous default fixes the element type (int -> float allowed)
            (kind,) = kinds
            for element in value:
                if not _element_fits(element, kind):
                    raise ConfigError(f"{shown}: elements must be {kind.__name__} like the default {tuple(current)}, "
                                      f"got {element!r}")
            if kind is float:
                value = [float(v) for v in value]
        return tuple(value) if isinstance(current, tuple) else list(value)
    # None (any type may replace it) and other types: the literal, else the text
    return text if value is _NOT_A_LITERAL else value


def _element_fits(element, kind) -> bool:
    if kind is int:
        return _is_int(element)
    if kind is float:
        return _is_real(element)
    return isinstance(element, kind)


def apply_overrides(config, overrides):
    """Apply ``--config.a.b=value`` items to ``config`` (in place, returned); types are kept (module doc)."""
    for flag, dotted, text in _pairs(overrides):
        node, parts = config, dotted.split(".")
        for depth, part in enumerate(parts):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if part not in keys:
                near = difflib.get_close_matches(part, keys, n=1)
                where = ".".join(parts[:depth]) or "the config"
                hint = f"; did you mean '{'.'.join(parts[:depth] + near)}'?" if near else ""
                raise ConfigError(f"{flag}: {where} has no key {part!r}{hint} (keys there: {sorted(keys)})")
            if depth < len(parts) - 1:
                node = node[part]
                if not hasattr(node, "keys"):
                    raise ConfigError(f"{flag}: {'.'.join(parts[:depth + 1])} is a value, not a section")
        value = _coerce(flag, node[parts[-1]], text)
        with config.unlocked() if hasattr(config, "unlocked") else _Null():
            try:
                node[parts[-1]] = value
            except TypeError as err:  # ml_collections' own type check (e.g. a field that was None, then set)
                raise ConfigError(f"{flag}={text}: {err}") from err
    return config


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ------------------------------------------------------------------------------------------------ validation

def _section(config, name):
    return config[name] if name in config and hasattr(config[name], "keys") else None


def _check(config, dotted: str, ok, expected: str):
    section, _, field = dotted.rpartition(".")
    node = _section(config, section) if section else config
    if node is None or field not in node:
        return
    value = node[field]
    if not ok(value):
        raise ConfigError(f"config.{dotted} must be {expected}, got {value!r} (set it with --config.{dotted}=...)")


def validate_config(config) -> None:
    """Check the fields the library reads, where present, before anything is built; ConfigError names the field.

    Only values are checked here (types are kept by ``apply_overrides``): step counts and sizes positive,
    names from the library's registries (schedule, model kind, optimizer decay, training target, sharding
    rule, solver, spacing), probabilities and decays in range.
    """
    from dpmjax.nn import MODEL_KINDS
    from dpmjax.samplers import SOLVERS
    from dpmjax.schedules import SCHEDULE_NAMES, SPACINGS
    from dpmjax.sharding import SHARDING_RULES

    positive_int = lambda v: _is_int(v) and v >= 1  # noqa: E731
    one_of = lambda names: (lambda v: v in names)  # noqa: E731
    checks = [
        ("seed", _is_int, "an integer"),
        ("schedule.name", one_of(SCHEDULE_NAMES + ("diffusers",)), f"one of {SCHEDULE_NAMES}"),
        ("schedule.num_train_timesteps", positive_int, "a positive integer"),
        ("model.kind", one_of(MODEL_KINDS), f"one of {MODEL_KINDS}"),
        ("model.num_classes", lambda v: v is None or positive_int(v), "None or a positive integer"),
        ("model.label_dropout", lambda v: _is_real(v) and 0 <= v < 1, "in [0, 1)"),
        ("data.batch_size", positive_int, "a positive integer"),
        ("data.image_shape", lambda v: isinstance(v, (tuple, list)) and len(v) == 3 and all(map(positive_int, v)),
         "three positive integers (H, W, C)"),
        ("optim.learning_rate", lambda v: _is_real(v) and v > 0, "a positive number"),
        ("optim.warmup_steps", lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
        ("optim.decay", one_of(("constant", "cosine")), "'constant' or 'cosine'"),
        ("optim.weight_decay", lambda v: _is_real(v) and v >= 0, "a non-negative number"),
        ("optim.grad_clip", lambda v: v is None or _is_real(v) and v >= 0, "None or a non-negative number"),
        ("train.num_steps", positive_int, "a positive integer"),
        ("train.log_every", positive_int, "a positive integer"),
        ("train.checkpoint_every", positive_int, "a positive integer"),
        ("train.keep_checkpoints", positive_int, "a positive integer"),
        ("train.target", one_of(("eps", "x0", "v")), "one of ('eps', 'x0', 'v')"),
        ("train.min_snr_gamma", lambda v: _is_real(v) and v >= 0, "a non-negative number (0: off)"),
        ("train.ema_decay", lambda v: _is_real(v) and 0 <= v < 1, "in [0, 1)"),
        ("train.sharding", one_of(SHARDING_RULES), f"one of {SHARDING_RULES}"),
        ("sample.solver", one_of(tuple(SOLVERS)), "a registered solver (`dpmjax solvers` lists them)"),
        ("sample.nfe", positive_int, "a positive integer"),
        ("sample.spacing", one_of(SPACINGS), f"one of {SPACINGS}"),
        ("sample.guidance_scale", lambda v: _is_real(v) and v >= 0, "a non-negative number"),
        ("sample.num", positive_int, "a positive integer"),
    ]
    for dotted, ok, expected in checks:
        _check(config, dotted, ok, expected)
