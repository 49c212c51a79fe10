"""DomainStudio on a digits teacher: 10-shot adaptation that keeps the source's diversity
(dpmjax/methods/domainstudio.py).

    dpmjax train --config configs/digits.py --workdir runs/digits                                  # the source
    dpmjax finetune --method domainstudio --teacher runs/digits --workdir runs/digits_invert_ds
    dpmjax finetune --method domainstudio --teacher runs/digits --workdir runs/ds_mirror \
        --config configs/methods/domainstudio.py:target=style:digits:mirror
    dpmjax sample --workdir runs/digits_invert_ds

The loss weights are the official unconditional flags (--pair_weight 4 --hf_pair_weight 4 --hf_mse_weight 1).
Variants: the adaptation ones (``target=SPEC``, ``shots=K``, ``steps=N``, ``runlocal``; see
configs/methods/full_finetune.py) and ``pair_weight=W``, ``hf_pair_weight=W``, ``hf_mse_weight=W``. The paper's
256x256 ADM recipe (lr 1e-4, batch 3 per GPU) is for 8 A6000s; ``configs/methods/domainstudio_cifar10.py`` is
the accelerator-scale config on the converted ddpm-cifar10-32 UNet.
"""
from dpmjax.methods.adaptation import adaptation_config


def get_config(arg=None):
    c, arg = adaptation_config("domainstudio", arg, pair_weight=4.0, hf_pair_weight=4.0, hf_mse_weight=1.0)
    c.method.update(pair_weight=arg.pair_weight, hf_pair_weight=arg.hf_pair_weight, hf_mse_weight=arg.hf_mse_weight,
                    sim_size=0)
    c.lock()
    return c
