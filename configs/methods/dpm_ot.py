"""DPM-OT (Li et al. ICCV 2023): semi-discrete OT from the prior noise to noised training images, k solver steps.

    dpmjax finetune --method dpm_ot --config configs/methods/dpm_ot.py --teacher runs/digits --workdir runs/digits_ot
    dpmjax finetune --method dpm_ot --config configs/methods/dpm_ot.py:k=2 --teacher runs/digits --workdir runs/ot_k2
    dpmjax finetune ... --config configs/methods/dpm_ot.py:runlocal       # a few updates (smoke test)

``dpmjax.methods.dpm_ot`` documents the algorithm. Sections:
  method:  num_targets  n training images, noised once to t_k (the state holds them: n x H x W x C floats);
           k            model evaluations of the short chain after the OT map (the official backSteps);
           solver, spacing   the chain from t_k to the end (any registered solver; a t-based spacing);
           t_k          the targets' time; 0 = derived: the point of a ``reference_nfe``-step grid of ``spacing``
                        from the schedule's start that has k steps left (official: the last backSteps of the
                        232-level NCSN chain);
           mc_batch, mc_batches   Monte Carlo source samples per update (official bat_size_sr, num_bat_sr):
                        the mass of each cell is estimated from mc_batch * mc_batches N(0, I) draws;
           lr_ot        Adam's learning rate on the heights (official 0.1; beta 0.9 / 0.999 fixed).
  data:    batch_size is unused (no real batch is read) but must divide the device count; the targets come from
           the teacher's dataset (or ``data.name``) train split.
  train:   num_steps  Adam steps on the heights; ema_decay unused (the network is the teacher's).
"""
import ml_collections

from dpmjax.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, k=5, runlocal=False)
    k, runlocal = arg.k, arg.runlocal
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.method = dict(name="dpm_ot", num_targets=1024, k=k, solver="dpmpp_2m", spacing="logSNR", t_k=0.0,
                    reference_nfe=20, mc_batch=4096, mc_batches=4, lr_ot=0.1)
    c.data = dict(batch_size=8)
    c.optim = dict()
    c.train = dict(num_steps=2000, log_every=100, checkpoint_every=1000, keep_checkpoints=3, sharding="replicate",
                   ema_decay=0.0)
    if runlocal:
        c.method.update(num_targets=64, mc_batch=512, mc_batches=1)
        c.train.update(num_steps=10, log_every=5, checkpoint_every=10)
    c.lock()
    return c
