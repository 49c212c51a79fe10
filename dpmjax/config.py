"""Configs: Python files returning a locked ``ml_collections.ConfigDict``, with ``--config.a.b=value`` overrides.

    config = load_config("configs/digits.py")                       # or "digits.py", "configs/cifar10.py:v"
    config = load_config("configs/digits.py", ["--config.train.num_steps=100"])

A bare file name is looked up in the repository's ``configs/`` folder. The CLI, experiments and tests load
configs only through this module.
"""
from __future__ import annotations

import os

__all__ = ["configs_dir", "load_config"]



def configs_dir() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load_config(spec: str, overrides=()):
    """``path/to/config.py[:arg]`` -> ConfigDict, then apply ``--config.key=value`` overrides."""
    import ast
    import difflib
    import importlib.util

    path, _, arg = spec.partition(":")
    if not os.path.exists(path) and os.path.exists(os.path.join(configs_dir(), os.path.basename(path))):
        path = os.path.join(configs_dir(), os.path.basename(path))
    if not os.path.exists(path):
        raise ValueError(f"--config: no config file {path!r} (configs live in {configs_dir()})")
    module_spec = importlib.util.spec_from_file_location("dpmjax_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    for item in overrides:
        if not item.startswith("--config.") or "=" not in item:
            raise ValueError(f"unrecognised argument {item!r} (overrides look like --config.train.num_steps=100)")
        dotted, _, text = item[len("--config."):].partition("=")
        node, parts = config, dotted.split(".")
        for depth, part in enumerate(parts):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if part not in keys:
                near = difflib.get_close_matches(part, keys, n=1)
                hint = f"; did you mean {'.'.join(parts[:depth] + near)!r}?" if near else ""
                raise ValueError(f"config has no key {dotted!r}{hint} (valid here: {sorted(keys)})")
            if depth < len(parts) - 1:
                node = node[part]
        current = node[parts[-1]]
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        if isinstance(current, float) and isinstance(value, int):
            value = float(value)
        if isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)
        with config.unlocked() if hasattr(config, "unlocked") else _null():
            node[parts[-1]] = value
    return config


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
