"""UNet on scikit-learn's bundled 8x8 digits: the default, offline main job (``dpmjax quickstart`` trains it).

    dpmjax train --config configs/digits.py --workdir runs/digits
    dpmjax train --config configs/digits.py --workdir runs/digits --config.train.num_steps=200
    dpmjax train --config configs/digits.py:cond --workdir runs/digits_cond      # class-conditional, for CFG
    dpmjax sample --workdir runs/digits_cond --labels 3 --guidance-scale 2 --num 64
    dpmjax quickstart --config configs/digits.py:runlocal --workdir /tmp/smoke --num 32   # smoke run, seconds

Variants (``configs/common.py`` explains the syntax):
  cond:     class-conditional (10 classes + the null class, label dropout 0.1) for classifier-free guidance;
            ``dpmjax sample`` then draws the classes of ``--labels`` guided by ``config.sample.guidance_scale``.
  xattn:    class-conditional through cross-attention only, as Stable Diffusion is through its prompt: the label is
            a learned sequence of 2 tokens of width 32 (``model.label_tokens``, null class for CFG) read by
            cross-attention at 4x4 and in the middle block; the teacher of ``--method speedupnet``.
  runlocal: the tiny UNet, 10 steps at batch 16 (tests and smoke runs).
"""
from . import common


def get_config(arg=None):
    arg = common.parse_arg(arg, runlocal=False, cond=False, xattn=False)
    c = common.base()
    # ~173k parameters: 8x8 -> 4x4, no attention (at 8x8, attention cost more step time than it gave quality),
    # v-prediction, learning rate 4e-3, 2000 steps (about 60 ms per step at batch 128 on 2 idle cores), sampled
    # on the Karras grid: experiments/quickstart_quality.py and BENCHMARKS.md "Quickstart quality" chose these.
    c.model = dict(kind="unet", model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
                   num_heads=2, dropout=0.0, num_groups=8, mid_attention=False, bfloat16=False)
    c.data = dict(name="digits", image_shape=(8, 8, 1), batch_size=128, random_flip=False)
    c.optim.update(learning_rate=4e-3, warmup_steps=100, decay="cosine")
    c.train.update(num_steps=2000, target="v", ema_decay=0.995, log_every=50, checkpoint_every=500)
    c.sample.update(solver="dpmpp_2m", nfe=10, spacing="karras", num=1000)
    if arg.runlocal:
        c.model = common.tiny_unet()
        common.runlocal(c)
    if arg.cond:
        c.model.update(num_classes=10, label_dropout=0.1)
        c.sample.guidance_scale = 2.0
    if arg.xattn:
        c.model.update(num_classes=10, label_dropout=0.1, context_dim=32, label_tokens=2, attention_resolutions=(4,),
                       mid_attention=True)
        c.sample.guidance_scale = 2.0
    c.lock()
    return c
