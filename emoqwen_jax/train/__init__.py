"""Training: loss, optimiser, jitted step, checkpoints and the stage runner."""
