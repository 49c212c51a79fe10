"""Finetuning and distillation methods (layer 7): one module per paper, run by one loop.

    dpmjax finetune --method mmd_ddm --teacher runs/digits --workdir runs/digits_mmd
    state = dpmjax.methods.finetune("mmd_ddm", teacher, config, workdir)

``base`` defines the contract (``Teacher``, ``Program``, ``Method``), ``loop`` the finetune loop, and each
method module a ``METHOD`` (its ``build`` and ``validate``). ``METHODS`` lists them by name.
"""
from __future__ import annotations

import importlib

from dpmjax.methods.base import Method, Program, Teacher, abstract_teacher

__all__ = ["METHODS", "METHOD_MODULES", "get_method", "finetune", "load_student", "Method", "Program",
           "Teacher", "abstract_teacher"]

# name -> module under dpmjax/methods/ that defines METHOD (imported on first use: jax programs stay unbuilt)
METHOD_MODULES = {
    "mmd_ddm": "dpmjax.methods.mmd_ddm",
    "dpm_ot": "dpmjax.methods.dpm_ot",
    "dmd2": "dpmjax.methods.dmd2",
    "step_by_step": "dpmjax.methods.step_by_step",
    "prdp": "dpmjax.methods.prdp",
    "ddpo": "dpmjax.methods.ddpo",
    "adjoint_reward": "dpmjax.methods.adjoint_reward",
    "full_finetune": "dpmjax.methods.full_finetune",
    "lora": "dpmjax.methods.lora",
    "qst": "dpmjax.methods.qst",
    "domainstudio": "dpmjax.methods.domainstudio",
    "spectral_distill": "dpmjax.methods.spectral_distill",
    "sparse": "dpmjax.methods.sparse",
    "early_exit": "dpmjax.methods.early_exit",
    "speedupnet": "dpmjax.methods.speedupnet",
    "lmd": "dpmjax.methods.lmd",
}
METHODS = tuple(METHOD_MODULES)


def get_method(name: str) -> Method:
    """The registered method ``name``; ValueError listing the choices otherwise."""
    if not isinstance(name, str) or name not in METHOD_MODULES:
        raise ValueError(f"unknown method {name!r}; choose one of {list(METHOD_MODULES)}")
    method = importlib.import_module(METHOD_MODULES[name]).METHOD
    assert method.name == name, (method.name, name)
    return method


def finetune(*args, **kwargs):
    """``dpmjax.methods.loop.finetune``."""
    from dpmjax.methods.loop import finetune as run

    return run(*args, **kwargs)


def load_student(*args, **kwargs):
    """``dpmjax.methods.loop.load_student``."""
    from dpmjax.methods.loop import load_student as load

    return load(*args, **kwargs)
