"""Quantized Side Tuning of a digits teacher on 10 shots of a target domain (dpmjax/methods/qst.py).

    dpmjax train --config configs/digits.py --workdir runs/digits                                  # the source
    dpmjax finetune --method qst --teacher runs/digits --workdir runs/digits_invert_qst \
        --config configs/methods/qst.py
    dpmjax finetune --method qst --teacher runs/digits --workdir runs/qst_r4 \
        --config configs/methods/qst.py:reduction=4,target=style:digits:mirror
    dpmjax sample --workdir runs/digits_invert_qst

Variants (``dpmjax.methods.adaptation.adaptation_config``): ``target=SPEC``, ``shots=K``, ``steps=N``,
``runlocal`` (4 updates), and ``reduction=R`` (side width d / R; 4 here: the digits UNet's blocks have 16 and 32
channels, so R = 8 would leave side streams of 2 and 4 channels). The side network starts from scratch (only its
output projection at zero), so it takes a larger step than full finetuning: learning rate 2e-3.
"""
from dpmjax.methods.adaptation import adaptation_config


def get_config(arg=None):
    c, arg = adaptation_config("qst", arg, reduction=4)
    c.method.update(reduction=int(arg.reduction), adapter_dim=16, gate_init=0.5, quantize=("kernels",),
                    double_quant=True)
    c.optim.learning_rate = 2e-3
    c.lock()
    return c
