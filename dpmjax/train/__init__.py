"""Training: denoising losses, optimizer, train state + EMA, mesh/shardings, jitted step, checkpoints, loop."""
