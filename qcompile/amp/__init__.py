"""Mixed-precision training helpers for the user's own loop: FP32 master weights and dynamic loss
scaling. They compose with `torch.autocast` and `torch.amp.GradScaler` rather than replacing them."""
from .loss_scaling import DynamicLossScaler, LossScalerError, ScalerStep
from .master_weights import MasterWeights, MasterWeightsError

__all__ = ["DynamicLossScaler", "LossScalerError", "MasterWeights", "MasterWeightsError", "ScalerStep"]
