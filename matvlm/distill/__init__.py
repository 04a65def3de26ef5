"""Distillation of a hybrid from its teacher: losses, the shared-weight distiller, mixer alignment, ranked
placement, the trainer."""

from .distiller import Distiller, LossSettings, check_pair
from ..training import end_process_group  # for launched scripts that call distill()
from .trainer import DistillConfig, distill

__all__ = ["Distiller", "LossSettings", "check_pair", "DistillConfig", "distill", "end_process_group"]
