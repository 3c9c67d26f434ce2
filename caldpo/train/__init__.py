"""Training: config, data, batches, model, losses, trainer, checkpoints.

``caldpo.train.main(overrides)`` runs a training job in this process (the same as
``python -m caldpo.train <overrides>``).
"""


def main(overrides: list[str] | None = None) -> dict:
    from .trainer import main as _main
    return _main(overrides)
