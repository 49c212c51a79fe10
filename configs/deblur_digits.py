"""Deblurring on scikit-learn's digits upsampled to 16 x 16 (CPU scale): regression vs icDPM vs guided icDPM.

    python experiments/deblur.py                                   # trains all three, CSV + PNG in results/deblur
    python experiments/deblur.py --config configs/deblur_digits.py:runlocal      # smoke run, a minute
    python experiments/deblur.py --config.train.num_steps=3000 --config.eval.nfe="(10,20)"

Blur (``dpmjax.data.blur``): training pairs from straight motion kernels of length 2-5 px in a 7 x 7 support
plus noise std <= 0.02; two held-out families: anisotropic Gaussian blur (std 1-1.8 px, another kernel family)
and shaky random-walk motion of 4-6 px (another family, longer than any training kernel).

Not a ``dpmjax train`` / ``dpmjax finetune`` config: the trainer is ``dpmjax.methods.deblur`` (its docstring says
why), run by the experiment script above; ``model.kind = "deblur_unet"`` is ``dpmjax.nn.deblur.DeblurUNet``.

Variants: runlocal: a tiny net, 20 steps, a batch of 16.
"""
from . import common


def get_config(arg=None):
    arg = common.parse_arg(arg, runlocal=False)
    c = common.base()
    c.data = dict(name="digits", image_shape=(16, 16, 1), batch_size=32)
    c.blur = dict(
        train=dict(kind="motion_line", strength=(2.0, 5.0), kernel_size=7, noise_std=(0.0, 0.02), anisotropy=1.0),
        heldout=dict(kind="gaussian", strength=(1.0, 1.8), kernel_size=7, noise_std=(0.0, 0.02), anisotropy=0.4),
        heldout_walk=dict(kind="motion_walk", strength=(4.0, 6.0), kernel_size=7, noise_std=(0.0, 0.02),
                          anisotropy=1.0))
    # 16 -> 8 -> 4, guidance at 1/2 (8 x 8) and 1/4 (4 x 4) as in the paper's two coarse scales. Width 16 and
    # batch 32: on the shared 2-core CPU of BENCHMARKS.md a width-32 / batch-64 update took ~3 s of wall time.
    c.model = dict(kind="deblur_unet", model_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, dropout=0.0, num_groups=8,
                   guidance_channels=16, guidance_blocks=2)
    c.deblur = dict(guidance_factors=(2, 4), guidance_weight=1.0)
    c.optim = dict(learning_rate=2e-3, warmup_steps=100, decay="cosine", weight_decay=0.0, grad_clip=1.0)
    c.train.update(num_steps=600, target="v", ema_decay=0.99, log_every=100)
    c.sample.update(solver="dpmpp_2m", nfe=10, spacing="logSNR", num=200)   # num: test images restored and scored
    c.eval = dict(nfe=(10,))                                                # NFEs the experiment scores
    if arg.runlocal:
        c.model.update(model_channels=8, channel_mult=(1, 2, 2), guidance_channels=8, guidance_blocks=1,
                       num_groups=4)
        c.data.batch_size = 16
        c.optim.warmup_steps = 0
        c.train.update(num_steps=20, log_every=10)
        c.sample.num = 16
    c.lock()
    return c
