"""Distillation of a hybrid from its teacher: losses, the shared-weight distiller, mixer alignment, ranked
placement, the trainer."""

from matvlm.distill.distiller import Distiller, LossSettings, check_pair
from matvlm.training import end_process_group  # for launched scripts that call distill()
from matvlm.distill.trainer import DistillConfig, distill

__all__ = ["Distiller", "LossSettings", "check_pair", "DistillConfig", "distill", "end_process_group"]
