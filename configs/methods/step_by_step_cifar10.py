"""Distilling step-by-step at paper scale: a 1-step CIFAR-10 student with the teacher's trajectory as the
auxiliary "rationale" (dpmjax/methods/step_by_step.py; needs a GPU / TPU).

    dpmjax convert --from-diffusers /path/to/ddpm-cifar10-32 --out runs/ddpm_cifar10          # the teacher
    dpmjax finetune --method step_by_step --teacher runs/ddpm_cifar10 --workdir runs/cifar10_sbs \
        --config configs/methods/step_by_step_cifar10.py:pairs=50000                 # :aux=false for the ablation

The auxiliary head widens the teacher UNet's output convolution ``conv_out`` (the converted
google/ddpm-cifar10-32 or a dpmjax UNet, e.g. ``dpmjax train --config configs/cifar10.py``). Knowledge
distillation in the style of Luhman & Luhman (2021): pairs (x_T, the teacher's 20-NFE
DPM-Solver++ output and K = 3 states of its trajectory) made once by the teacher, then regression of the one-step student on
them (alpha = 0.5 between the output and the rationale, as Distilling step-by-step's task weighting). The
teacher makes the pairs inside the jitted init (50,000 pairs x 20 UNet calls: minutes on an accelerator);
the state holds them (~2.5 GB in float32 for 50,000 pairs with 3 states). Variants: pairs=N, aux=false, states=K.
"""
from dpmjax.config import parse_arg

from . import step_by_step


def get_config(arg=None):
    arg = parse_arg(arg, pairs=50000, aux=True, states=3)
    c = step_by_step.get_config(f"pairs={arg.pairs},aux={str(arg.aux).lower()},states={arg.states}")
    with c.unlocked():
        c.data = dict(name="tfds:cifar10", image_shape=(32, 32, 3), batch_size=128)
        c.method.update(teacher_nfe=20, spacing="logSNR")
        c.train.update(num_steps=200_000, log_every=100, checkpoint_every=5000, sharding="fsdp", ema_decay=0.9999)
    return c
