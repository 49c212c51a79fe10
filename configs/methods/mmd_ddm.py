"""MMD-DDM on a digits teacher: finetune for a T'-step DDIM sampler (dpmjax/methods/mmd_ddm.py).

    dpmjax train --config configs/digits.py --workdir runs/digits                   # the teacher
    dpmjax finetune --method mmd_ddm --teacher runs/digits --workdir runs/digits_mmd4
    dpmjax finetune --method mmd_ddm --teacher runs/digits --workdir runs/digits_mmd2 --config configs/methods/mmd_ddm.py:steps=2
    dpmjax sample --workdir runs/digits_mmd4                                          # DDIM, T' = 4 steps
    dpmjax eval --workdir runs/digits_mmd4 --solvers ddim --nfe 4                     # FD in the seed-0 classifier

Variants: ``steps=N`` (T'), ``solver=NAME``, ``features=SPEC`` (``dpmjax.metrics.features``), ``runlocal`` (a
few updates at batch 8: a smoke test). The paper's CIFAR-10 recipe (Adam 5e-6, clip 0.5, batch 64, Inception
features, DDIM) is ``configs/methods/mmd_ddm_cifar10.py``.
"""
import ml_collections

from dpmjax.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, steps=4, solver="ddim", features="classifier:digits:1", runlocal=False)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.method = dict(name="mmd_ddm", steps=arg.steps, solver=arg.solver, spacing="time_uniform",
                    solver_options={}, features=arg.features, kernel="polynomial", kernel_options={}, remat=True,
                    normalize_features=True)
    c.data = dict(batch_size=64)  # m real and m generated images per update (the paper's 64)
    c.optim = dict(learning_rate=1e-4, warmup_steps=0, decay="constant", weight_decay=0.0, grad_clip=0.5)
    c.train = dict(num_steps=300, log_every=25, checkpoint_every=100, keep_checkpoints=3, sharding="replicate",
                   ema_decay=0.0)
    if arg.runlocal:
        c.data.batch_size = 8
        c.train.update(num_steps=4, log_every=2, checkpoint_every=2)
    c.lock()
    return c
