"""PRDP at paper scale on the converted google/ddpm-cifar10-32 teacher, for accelerators
(dpmjax/methods/prdp.py; the DDPO / REINFORCE baselines at the same budget with ``baseline=``).

    dpmjax convert --from-diffusers /path/to/ddpm-cifar10-32 --out runs/ddpm_cifar10          # the teacher
    dpmjax finetune --method prdp --teacher runs/ddpm_cifar10 --workdir runs/cifar10_prdp \\
        --config configs/methods/prdp_cifar10.py
    dpmjax finetune --method ddpo --teacher runs/ddpm_cifar10 --workdir runs/cifar10_ddpo \\
        --config configs/methods/prdp_cifar10.py:baseline=ppo          # or baseline=reinforce
    dpmjax sample --workdir runs/cifar10_prdp --num 64                        # the 50-step DDPM policy

PRDP's small-scale recipe (Table 4): E = 100 epochs of N = 32 prompts x B = 16 trajectories of the 50-step
DDPM sampler, K = 10 updates per epoch, AdamW lr 1e-5, weight decay 1e-4, gradient clip 1.0, the whole UNet
finetuned. The teacher is unconditional, so a "prompt" is a group of 16 trajectories (the pairs PRDP regresses
on); the reward is DDPO's JPEG compressibility (``reward=jpeg_incompressibility`` for the opposite task, any
``reward_from_spec`` string). beta and eps are not the paper's: its 3e-5 / 1e-6 are for HPSv2 scores
(differences ~0.01), a JPEG reward differs by ~0.1-1 kB between samples, so beta is scaled to keep the targets
(Δr / beta ~ 300) and eps is the large-scale / multi-reward setting 1e-4 (untested at this scale: no
accelerator in our CI). DDPO's PPO clip is the official ddpo-pytorch 1e-4. 512 trajectories of 51 states fill
the buffer (320 MB in float32); fsdp shards the UNet and its optimizer state over the data axis.
"""
import ml_collections

from dpmjax.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, baseline="", reward="jpeg_compressibility")
    if arg.baseline not in ("", "ppo", "reinforce"):
        raise ValueError(f"baseline must be ppo or reinforce (or empty for PRDP), got {arg.baseline!r}")
    c = ml_collections.ConfigDict()
    c.seed = 0
    common = dict(reward=arg.reward, groups=32, group_size=16, steps=50, eta=1.0, spacing="time_uniform",
                  updates_per_epoch=10)
    if arg.baseline:
        c.method = dict(name="ddpo", objective=arg.baseline, clip_range=1e-4, adv_clip=5.0, **common)
        if arg.baseline == "reinforce":
            c.method.updates_per_epoch = 1  # the score-function estimator is unbiased only at theta = pi_old
    else:
        c.method = dict(name="prdp", beta=1e-3, clip_range=1e-4, **common)
    c.data = dict(batch_size=512)  # no real data is read: G x n trajectories sampled per epoch
    c.optim = dict(learning_rate=1e-5, warmup_steps=0, decay="constant", weight_decay=1e-4, grad_clip=1.0)
    epochs = 100
    c.train = dict(num_steps=epochs * c.method.updates_per_epoch, log_every=10, checkpoint_every=100,
                   keep_checkpoints=3, sharding="fsdp", ema_decay=0.0)
    c.lock()
    return c
