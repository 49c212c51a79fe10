"""Deblurring on CIFAR-10 32 x 32 RGB for accelerators: regression vs icDPM vs guided icDPM (Ren et al., ICCV 2023).

    python experiments/deblur.py --config configs/deblur_cifar10.py     # needs tfds cifar10 (network or data_dir)

Not a ``dpmjax train`` / ``dpmjax finetune`` config: the trainer is ``dpmjax.methods.deblur`` (its docstring says
why), run by the experiment script above; ``model.kind = "deblur_unet"`` is ``dpmjax.nn.deblur.DeblurUNet``.

Not run on the CPU of BENCHMARKS.md (hours there). Blur: training on straight motion kernels of 3-9 px in an
11 x 11 support (noise std <= 0.02); held out: anisotropic Gaussian (std 1.2-2.5 px) and random-walk motion of
7-10 px. Guidance from gray(y) at 1/2, 1/4 and 1/8 (16, 8, 4 px), the paper's coarse scales.
"""
from . import common


def get_config(arg=None):
    arg = common.parse_arg(arg, runlocal=False)
    c = common.base()
    c.data = dict(name="cifar10", image_shape=(32, 32, 3), batch_size=128)
    c.blur = dict(
        train=dict(kind="motion_line", strength=(3.0, 9.0), kernel_size=11, noise_std=(0.0, 0.02), anisotropy=1.0),
        heldout=dict(kind="gaussian", strength=(1.2, 2.5), kernel_size=11, noise_std=(0.0, 0.02), anisotropy=0.4),
        heldout_walk=dict(kind="motion_walk", strength=(7.0, 10.0), kernel_size=11, noise_std=(0.0, 0.02),
                          anisotropy=1.0))
    c.model = dict(kind="deblur_unet", model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, dropout=0.1, num_groups=32,
                   guidance_channels=64, guidance_blocks=3)
    c.deblur = dict(guidance_factors=(2, 4, 8), guidance_weight=1.0)
    c.optim = dict(learning_rate=2e-4, warmup_steps=1000, decay="cosine", weight_decay=0.0, grad_clip=1.0)
    c.train.update(num_steps=100_000, target="v", ema_decay=0.9999, log_every=500)
    c.sample.update(solver="dpmpp_2m", nfe=20, spacing="logSNR", num=10_000)   # num: test images restored and scored
    c.eval = dict(nfe=(10, 20))                                                 # NFEs the experiment scores
    if arg.runlocal:
        c.model.update(model_channels=16, num_res_blocks=1, guidance_channels=8, guidance_blocks=1, num_groups=4,
                       dropout=0.0)
        c.data.batch_size = 16
        c.optim.warmup_steps = 0
        c.train.update(num_steps=10, log_every=5)
        c.sample.num = 16
        c.eval.nfe = (10,)
    c.lock()
    return c
