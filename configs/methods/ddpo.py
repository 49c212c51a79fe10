"""DDPO (PPO clip) or REINFORCE on a class-conditional digits teacher, PRDP's baselines with the same reward,
groups and reward-query budget as configs/methods/prdp.py (dpmjax/methods/ddpo.py).

    dpmjax finetune --method ddpo --teacher runs/digits_cond --workdir runs/digits_ddpo
    dpmjax finetune --method ddpo --teacher runs/digits_cond --workdir runs/digits_reinforce \\
        --config configs/methods/ddpo.py:objective=reinforce

Variants: ``objective=ppo|reinforce`` (reinforce sets one update per epoch: the score-function estimator is
unbiased only at the sampling params), ``reward=SPEC``, ``clip=EPS``, ``runlocal``.
"""
import ml_collections

from dpmjax.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, objective="ppo", reward="classifier:digits:label", clip=1e-4, runlocal=False)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.method = dict(name="ddpo", objective=arg.objective, reward=arg.reward, groups=8, group_size=8, steps=10,
                    eta=1.0, spacing="time_uniform", updates_per_epoch=4 if arg.objective == "ppo" else 1,
                    clip_range=arg.clip, adv_clip=5.0)
    c.data = dict(batch_size=64)  # no real data is read: G x n images sampled per epoch
    c.optim = dict(learning_rate=1e-4, warmup_steps=0, decay="constant", weight_decay=1e-4, grad_clip=1.0)
    c.train = dict(num_steps=400, log_every=4, checkpoint_every=100, keep_checkpoints=3, sharding="replicate",
                   ema_decay=0.0)
    if arg.runlocal:
        c.method.update(groups=2, group_size=2, steps=3, updates_per_epoch=2 if arg.objective == "ppo" else 1)
        c.data.batch_size = 4
        c.train.update(num_steps=4, log_every=2, checkpoint_every=2)
    c.lock()
    return c
