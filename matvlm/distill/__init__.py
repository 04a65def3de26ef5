"""Single-stage distillation of a hybrid from its teacher: losses, the shared-weight distiller, the trainer."""

from .distiller import Distiller, LossSettings, check_pair
from .trainer import DistillConfig, distill, end_process_group

__all__ = ["Distiller", "LossSettings", "check_pair", "DistillConfig", "distill", "end_process_group"]
