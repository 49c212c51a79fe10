"""LoRA finetuning of a digits teacher on 10 shots of a target domain (dpmjax/methods/lora.py).

    dpmjax train --config configs/digits.py --workdir runs/digits                                  # the source
    dpmjax finetune --method lora --teacher runs/digits --workdir runs/digits_invert_lora \
        --config configs/methods/lora.py
    dpmjax finetune --method lora --teacher runs/digits --workdir runs/lora_r8 \
        --config configs/methods/lora.py:rank=8,target=style:digits:mirror
    dpmjax sample --workdir runs/digits_invert_lora

Variants (``dpmjax.methods.adaptation.adaptation_config``): ``target=SPEC``, ``shots=K``, ``steps=N``,
``runlocal`` (4 updates), and ``rank=R`` (4; alpha = rank). Adapters learn faster than full weights at the
same step size (Hu et al. use 1e-4 to 2e-4 on GPT-3 where full finetuning used 1e-5 to 2e-5): learning rate
2e-3 here, 4x the full-finetuning config's.
"""
from dpmjax.methods.adaptation import adaptation_config


def get_config(arg=None):
    c, arg = adaptation_config("lora", arg, rank=4)
    c.method.update(rank=int(arg.rank), alpha=None, targets=("blocks",))
    c.optim.learning_rate = 2e-3
    c.lock()
    return c
