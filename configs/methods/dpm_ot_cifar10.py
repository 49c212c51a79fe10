"""DPM-OT at paper scale: CIFAR-10 with the converted google/ddpm-cifar10-32 teacher (dpmjax/methods/dpm_ot.py).

    dpmjax convert --from-diffusers /path/to/ddpm-cifar10-32 --out runs/ddpm_cifar10          # the teacher
    dpmjax finetune --method dpm_ot --teacher runs/ddpm_cifar10 --workdir runs/cifar10_ot \
        --config configs/methods/dpm_ot_cifar10.py:k=10
    dpmjax sample --workdir runs/cifar10_ot --num 50000 --out samples.npz                   # OT map + k steps

The official recipe (cognaclee/DPM-OT, configs/cifar10.yml): backSteps = 10 steps after the map, the dual
heights fitted by Adam (lr 0.1, betas 0.9 / 0.999) with Monte Carlo cell masses, up to 10,000 iterations,
targets = the training images noised to the level k steps before the end. All 50,000 training images are
targets here (the state holds them: ~600 MB in float32, plus the teacher); the Monte Carlo batch is 4 x 16,384
source draws per update (each update then sees ~1.3 draws per cell: run many updates, or raise mc_batches).
Variants: k=N.
"""
from dpmjax.config import parse_arg

from . import dpm_ot


def get_config(arg=None):
    arg = parse_arg(arg, k=10)
    c = dpm_ot.get_config(f"k={arg.k}")
    with c.unlocked():
        c.data = dict(name="tfds:cifar10", image_shape=(32, 32, 3), kwargs=dict(image_key="image", label_key="label"),
                      batch_size=8)
        c.method.update(num_targets=50000, mc_batch=16384, mc_batches=4, lr_ot=0.1)
        c.train.update(num_steps=10000, log_every=100, checkpoint_every=1000)
    return c
