"""PRDP on the digits teacher (dpmjax/methods/prdp.py). Default task: the unconditional teacher learns to draw
3s, reward log p(3 | x) of the seed-0 digits classifier -- experiments/prdp.py's task "three", whose settings
these are (results in BENCHMARKS.md).

    dpmjax train --config configs/digits.py --workdir runs/digits                                  # the teacher
    dpmjax finetune --method prdp --teacher runs/digits --workdir runs/digits_prdp
    dpmjax train --config configs/digits.py:cond --workdir runs/digits_cond          # a class-conditional one
    dpmjax finetune --method prdp --teacher runs/digits_cond --workdir runs/digits_prdp_next \\
        --config configs/methods/prdp.py:reward=classifier:digits:next       # class c drawn like c + 1
    dpmjax sample --workdir runs/digits_prdp --num 48                                   # DDPM, 10 steps

Variants: ``reward=SPEC`` (``dpmjax.metrics.rewards.reward_from_spec``: ``jpeg_incompressibility``,
``classifier:digits:label``, ``0.5*classifier:digits:label+0.1*jpeg_compressibility``, ...), ``beta=B``,
``clip=EPS``, ``runlocal`` (2 groups of 2, 3 steps, 2 updates: a smoke test). One epoch = ``updates_per_epoch``
updates on G x n fresh trajectories (G n reward queries); ``train.num_steps`` counts updates: 800 = 200 epochs =
3200 reward queries. beta = 1 for log-probability rewards (differences of ~10 nats between samples; the paper's
3e-5 is for HPSv2 scores differing by ~0.01): on task "three" it ties DDPO (44 % vs 43 % 3s), where beta = 10
held the policy near the teacher (30 %); eps = 1e-2 bounds each per-step log-ratio's move per epoch; lr 3e-5 (the
paper's 1e-5 on SD; 1e-4 here made the policy drift by ~3 nats per step with no reward gain).
"""
import ml_collections

from dpmjax.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, reward="classifier:digits:3", beta=1.0, clip=1e-2, runlocal=False)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.method = dict(name="prdp", reward=arg.reward, groups=4, group_size=4, steps=10, eta=1.0,
                    spacing="time_uniform", updates_per_epoch=4, classes=None, beta=arg.beta, clip_range=arg.clip)
    c.data = dict(batch_size=16)  # no real data is read: G x n images sampled per epoch (divides the devices)
    # PRDP Table 4 (small scale): AdamW lr 1e-5, weight decay 1e-4, clip 1.0 on SD
    c.optim = dict(learning_rate=3e-5, warmup_steps=0, decay="constant", weight_decay=1e-4, grad_clip=1.0)
    c.train = dict(num_steps=800, log_every=4, checkpoint_every=200, keep_checkpoints=3, sharding="replicate",
                   ema_decay=0.0)
    if arg.runlocal:
        c.method.update(groups=2, group_size=2, steps=3, updates_per_epoch=2)
        c.data.batch_size = 4
        c.train.update(num_steps=4, log_every=2, checkpoint_every=2)
    c.lock()
    return c
