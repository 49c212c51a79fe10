"""Plain finetuning of a digits teacher on 10 shots of a target domain (dpmjax/methods/full_finetune.py).

    dpmjax train --config configs/digits.py --workdir runs/digits                                  # the source
    dpmjax finetune --method full_finetune --teacher runs/digits --workdir runs/digits_invert_ft
    dpmjax finetune --method full_finetune --teacher runs/digits --workdir runs/ft_mirror \
        --config configs/methods/full_finetune.py:target=style:digits:mirror
    dpmjax finetune --method full_finetune --teacher runs/digits --workdir runs/ft_mine \
        --config configs/methods/full_finetune.py:target=folder:my_images,shots=10
    dpmjax finetune --method full_finetune --teacher runs/digits --workdir runs/ft_adamr \
        --config configs/methods/full_finetune.py:adamr=0.1                  # AdamR (DAREx-L2), then prune:
    dpmjax delta prune --base runs/digits --finetuned runs/ft_adamr --p 0.99 --variant dare --out runs/ft_adamr_p99
    dpmjax sample --workdir runs/digits_invert_ft

Variants (``dpmjax.methods.adaptation.adaptation_config``): ``target=SPEC`` (a dataset name: default
``style:digits:invert``, see ``dpmjax.data.few_shot``; ``folder:DIR`` for your own images), ``shots=K`` (10),
``steps=N`` (updates, 300), ``runlocal`` (4 updates: a smoke test), ``adamr=LAMBDA`` (``method.adamr_lambda``:
0 = plain AdamW; > 0 = AdamR's pull toward the teacher, ``dpmjax.train.adamr``).
"""
from dpmjax.methods.adaptation import adaptation_config


def get_config(arg=None):
    c, arg = adaptation_config("full_finetune", arg, adamr=0.0)
    c.method.adamr_lambda = float(arg.adamr)
    c.lock()
    return c
