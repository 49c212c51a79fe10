"""SpeedUpNet on a CIFAR-10 UNet conditioned through cross-attention (accelerator scale;
dpmjax/methods/speedupnet.py). ``tfds:cifar10`` needs network or a prepared ``data_dir`` for the teacher only: the
MSC distillation itself reads no data.

    dpmjax train --config configs/cifar10.py:xattn --workdir runs/cifar10_xattn            # CFG scale 3
    dpmjax finetune --method speedupnet --teacher runs/cifar10_xattn --workdir runs/cifar10_sun \
        --config configs/methods/speedupnet_cifar10.py
    dpmjax sample --workdir runs/cifar10_sun --num 50000 --batch-size 500 --labels 0,1,2,3,4,5,6,7,8,9

w = 3 folded in, 4 DDIM student steps against a 20-step guided DPM-Solver++(2M) trajectory, MSC over 2 consecutive
steps; 20k updates at batch 128, Adam 1e-4. Variants: those of configs/methods/speedupnet.py.
"""
import os

from dpmjax.config import configs_dir, load_config


def get_config(arg=None):
    base = load_config(os.path.join(configs_dir(), "methods", "speedupnet.py") + ":" + ",".join(
        ["steps=20000", "w=3.0"] + ([arg] if arg else [])))
    c = base.copy_and_resolve_references()
    with c.unlocked():
        c.data = dict(batch_size=128)
        c.optim.learning_rate = 1e-4
        c.train.update(log_every=100, checkpoint_every=2000)
    c.lock()
    return c
