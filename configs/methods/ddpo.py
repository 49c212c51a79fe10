"""DDPO (PPO clip) or REINFORCE on the digits teacher, PRDP's baselines with the same reward, groups and
reward-query budget as configs/methods/prdp.py (dpmjax/methods/ddpo.py): experiments/prdp.py's settings.

    dpmjax finetune --method ddpo --teacher runs/digits --workdir runs/digits_ddpo
    dpmjax finetune --method ddpo --teacher runs/digits --workdir runs/digits_reinforce \\
        --config configs/methods/ddpo.py:objective=reinforce

Variants: ``objective=ppo|reinforce`` (reinforce makes one update per epoch: the score-function estimator is
unbiased only at the sampling params, so it gets 200 updates for the same 3200 reward queries), ``reward=SPEC``,
``clip=EPS`` (1e-2, PRDP's radius here; the official ddpo-pytorch 1e-4 is for SD's latents), ``runlocal``.
"""
import ml_collections

from dpmjax.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, objective="ppo", reward="classifier:digits:3", clip=1e-2, runlocal=False)
    c = ml_collections.ConfigDict()
    c.seed = 0
    per_epoch = 4 if arg.objective == "ppo" else 1
    c.method = dict(name="ddpo", objective=arg.objective, reward=arg.reward, groups=4, group_size=4, steps=10,
                    eta=1.0, spacing="time_uniform", updates_per_epoch=per_epoch, classes=None, clip_range=arg.clip,
                    adv_clip=5.0)
    c.data = dict(batch_size=16)  # no real data is read: G x n images sampled per epoch
    c.optim = dict(learning_rate=3e-5, warmup_steps=0, decay="constant", weight_decay=1e-4, grad_clip=1.0)
    c.train = dict(num_steps=200 * per_epoch, log_every=per_epoch, checkpoint_every=50 * per_epoch,
                   keep_checkpoints=3, sharding="replicate", ema_decay=0.0)
    if arg.runlocal:
        c.method.update(groups=2, group_size=2, steps=3, updates_per_epoch=2 if arg.objective == "ppo" else 1)
        c.data.batch_size = 4
        c.train.update(num_steps=4, log_every=2, checkpoint_every=2)
    c.lock()
    return c
