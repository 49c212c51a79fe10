"""DMD2 on a digits teacher: a 1-step (or k-step) generator distilled by distribution matching (dpmjax/methods/dmd2.py).

    dpmjax train --config configs/digits.py --workdir runs/digits                                  # the teacher
    dpmjax finetune --method dmd2 --teacher runs/digits --workdir runs/digits_dmd2                  # 1 step
    dpmjax finetune --method dmd2 --config configs/methods/dmd2.py:steps=4 --teacher runs/digits --workdir runs/dmd2_4
    dpmjax finetune --method dmd2 --config configs/methods/dmd2.py:gan=false,ttur=1 ...             # ablations
    dpmjax sample --workdir runs/digits_dmd2 --num 64          # solver "renoise" at nfe = num_steps_gen

Variants (comma-separated, ``name`` or ``name=value``): ``steps=K`` (generator steps, 1 or 4 in the paper),
``gan=true|false``, ``ttur=N`` (critic updates per generator update; 1 = no TTUR), ``runlocal`` (a few updates
at batch 8: a smoke test).

Sections:
  method:  num_steps_gen, spacing (the generator's grid; "trailing" = the official 999/749/499/249), ttur (official
           5), gan, gan_weight (critic's GAN weight, official ImageNet 1e-2), gen_gan_weight (generator's, 3e-3),
           min/max_step_percent (DM loss times, 0.02 / 0.98), gan_max_step_percent (diffusion-GAN noise range, 1.0).
  data:    batch_size: generated images (and real images for the GAN) per update.
  optim:   AdamW for both generator and critic (official: same lr, betas (0.9, 0.999), weight decay 0.01, grad
           clip 10; lr 2e-6 on ImageNet-64 with a 300M-parameter net, batch 280 and 200k+ updates; the digits
           default 1e-3 is what moves a 173k-parameter generator within a few hundred updates).
  train:   num_steps (updates; the generator gets num_steps / ttur of them), ema_decay (the generator's EMA).
"""
import ml_collections

from dpmjax.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, steps=1, gan=True, ttur=5, runlocal=False)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.method = dict(name="dmd2", num_steps_gen=arg.steps, spacing="trailing", ttur=arg.ttur, gan=arg.gan,
                    gan_weight=1e-2, gen_gan_weight=3e-3, min_step_percent=0.02, max_step_percent=0.98,
                    gan_max_step_percent=1.0)
    c.data = dict(batch_size=32)
    # lr 1e-3: in a probe at 1e-4, 200 updates moved a digits generator little (FD 480 -> 388; the teacher: ~7)
    c.optim = dict(learning_rate=1e-3, warmup_steps=0, decay="constant", weight_decay=0.01, grad_clip=10.0,
                   b1=0.9, b2=0.999)
    c.train = dict(num_steps=1000, log_every=50, checkpoint_every=250, keep_checkpoints=3, sharding="replicate",
                   ema_decay=0.95)
    if arg.runlocal:
        c.data.batch_size = 8
        c.train.update(num_steps=10, log_every=5, checkpoint_every=10)
    c.lock()
    return c
