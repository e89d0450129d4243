"""Training of the FSS model: optimisers and schedule, the training loop, checkpoints."""

from fss_core.training.checkpoint import (
    load_checkpoint,
    load_model_weights,
    read_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from fss_core.training.optim import build_optimizers, poly_warmup_lr
from fss_core.training.trainer import (
    TrainCallbacks,
    TrainResult,
    TrainSettings,
    autocast_dtype,
    resolve_device,
    seed_everything,
    train,
    validate,
)

__all__ = [
    "TrainCallbacks",
    "TrainResult",
    "TrainSettings",
    "autocast_dtype",
    "build_optimizers",
    "load_checkpoint",
    "load_model_weights",
    "poly_warmup_lr",
    "read_checkpoint",
    "resolve_device",
    "rng_state",
    "save_checkpoint",
    "seed_everything",
    "set_rng_state",
    "train",
    "validate",
]
