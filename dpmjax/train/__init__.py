"""Training: denoising losses, optimizer, train state + EMA, the jitted sharded step with on-device metrics,
verified checkpoints, resume checks (config, logs) and the loop. (Diffusers conversion: ``dpmjax.convert``.)"""
