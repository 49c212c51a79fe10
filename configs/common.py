"""Shared defaults of every config, the variant-string parser, and the ``runlocal`` smoke-test shrink.

    dpmjax train --config configs/common.py --workdir runs/common          # the defaults on a tiny digits UNet
    dpmjax train --config configs/digits.py:runlocal --workdir /tmp/smoke  # any config, a few steps (seconds)

Every config in this folder starts from ``base()`` (``from . import common``) and changes what differs.

Variant strings (big_vision's ``parse_arg``): what follows the ``:`` in ``--config configs/NAME.py:ARG`` is a
comma-separated list of ``name`` (a flag set to True) and ``name=value`` items, each declared with its default
by the config (``parse_arg(arg, runlocal=False, cond=False)``); values take the default's type, unknown names
are errors. Examples: ``configs/digits.py:runlocal``, ``configs/digits.py:cond,runlocal``,
``configs/cifar10.py:v``. ``--config.a.b=value`` overrides are applied after the variant.

``runlocal`` (every config has it): the same model family shrunk to a smoke test that trains in seconds on a
laptop CPU: a handful of steps, a tiny batch, a small sample count. It checks wiring, not quality.

Sections:
  seed:      PRNG seed of init, data order and sampling noise.
  schedule:  noise schedule (``dpmjax.schedules.schedule_from_config``).
  optim:     AdamW with warmup, cosine/constant decay and clipping (``dpmjax.train.optim.make_optimizer``).
  train:     steps, target (eps / x0 / v), min-SNR weighting, EMA, log / checkpoint intervals, and
             ``sharding``: how params and optimizer state are placed over the "data" mesh axis ("replicate":
             whole on every device; "fsdp": split, ~1/n of the bytes per device; ``dpmjax.sharding``).
  sample:    what ``dpmjax sample`` / ``dpmjax eval`` use for a workdir unless flags say otherwise: solver,
             nfe, spacing, guidance_scale (classifier-free guidance of class-conditional models; 1 = the
             conditional model alone, 0 = the unconditional one) and num (samples).
"""
import ml_collections

from dpmjax.config import parse_arg  # noqa: F401  (configs use common.parse_arg)

# What `dpmjax sample` falls back to for workdirs without a sample section (dpmjax.workdir.SAMPLE_DEFAULTS
# holds the same values; tests/test_config.py checks they agree).
SAMPLE = dict(solver="dpmpp_2m", nfe=10, spacing="logSNR", guidance_scale=1.0, num=1000)


def base():
    """The shared defaults, unlocked, without ``model`` and ``data`` (each config adds its own)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.schedule = dict(name="linear", num_train_timesteps=1000)
    c.optim = dict(learning_rate=1e-3, warmup_steps=200, decay="cosine", weight_decay=0.0, grad_clip=1.0)
    c.train = dict(num_steps=4000, target="eps", min_snr_gamma=0.0, ema_decay=0.999, log_every=50,
                   checkpoint_every=500, keep_checkpoints=3, sharding="replicate")
    c.sample = dict(SAMPLE)
    return c


def runlocal(c):
    """Shrink steps, batch and sample count of ``c`` in place to a seconds-long smoke run (wiring, not quality)."""
    c.optim.warmup_steps = 0
    c.train.update(num_steps=10, log_every=5, checkpoint_every=10, keep_checkpoints=2)
    if "data" in c and "batch_size" in c.data:
        c.data.batch_size = 16
    c.sample.num = 16
    return c


def tiny_unet(**fields):
    """A UNet small enough that compiling its train step takes seconds (one level, 8 channels, no attention)."""
    return dict(kind="unet", model_channels=8, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(),
                num_heads=1, dropout=0.0, num_groups=4, mid_attention=False, bfloat16=False, **fields)


def get_config(arg=None):
    """The shared defaults made runnable: the tiny UNet on scikit-learn's digits."""
    arg = parse_arg(arg, runlocal=False)
    c = base()
    c.model = tiny_unet()
    c.data = dict(name="digits", image_shape=(8, 8, 1), batch_size=128, random_flip=False)
    c.train.num_steps = 1000
    if arg.runlocal:
        runlocal(c)
    c.lock()
    return c
