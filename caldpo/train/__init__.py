"""Training: config, data, batches, model, losses, trainer, checkpoints."""
