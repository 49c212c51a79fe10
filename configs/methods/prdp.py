"""PRDP on a class-conditional digits teacher: reward = the digits classifier's log p(label | x), i.e. images
that look like the class they were drawn for (dpmjax/methods/prdp.py).

    dpmjax train --config configs/digits.py:cond --workdir runs/digits_cond                   # the teacher
    dpmjax finetune --method prdp --teacher runs/digits_cond --workdir runs/digits_prdp
    dpmjax finetune --method prdp --teacher runs/digits --workdir runs/digits_prdp3 \\
        --config configs/methods/prdp.py:reward=classifier:digits:3              # unconditional: more 3s
    dpmjax sample --workdir runs/digits_prdp --labels 0,1,2 --num 48                  # DDPM, 10 steps

Variants: ``reward=SPEC`` (``dpmjax.metrics.rewards.reward_from_spec``: ``jpeg_incompressibility``,
``classifier:digits:3``, ``0.5*classifier:digits:label+0.1*jpeg_compressibility``, ...), ``beta=B``,
``clip=EPS``, ``runlocal`` (2 groups of 2, 3 steps, 2 updates: a smoke test). One epoch = ``updates_per_epoch``
updates on G x n fresh trajectories (G n reward queries); ``train.num_steps`` counts updates. beta and
clip_range are not tuned yet for this reward's scale (log-probabilities of order 1 instead of the paper's
HPSv2 scores of order 0.3).
"""
import ml_collections

from dpmjax.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, reward="classifier:digits:label", beta=1.0, clip=1e-2, runlocal=False)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.method = dict(name="prdp", reward=arg.reward, groups=8, group_size=8, steps=10, eta=1.0,
                    spacing="time_uniform", updates_per_epoch=4, beta=arg.beta, clip_range=arg.clip)
    c.data = dict(batch_size=64)  # no real data is read: G x n images sampled per epoch (divides the devices)
    # PRDP Table 4 (small scale): AdamW lr 1e-5, weight decay 1e-4, clip 1.0 on SD; a small UNet moves at 1e-4
    c.optim = dict(learning_rate=1e-4, warmup_steps=0, decay="constant", weight_decay=1e-4, grad_clip=1.0)
    c.train = dict(num_steps=400, log_every=4, checkpoint_every=100, keep_checkpoints=3, sharding="replicate",
                   ema_decay=0.0)
    if arg.runlocal:
        c.method.update(groups=2, group_size=2, steps=3, updates_per_epoch=2)
        c.data.batch_size = 4
        c.train.update(num_steps=4, log_every=2, checkpoint_every=2)
    c.lock()
    return c
