"""matvlm: hybrid Mamba-2/Transformer vision-language models by distillation (MaTVLM).

    import matvlm
    hybrid = matvlm.to_hybrid(teacher, ratio=0.25, placement="even")

Importing the package registers the "matvlm" model type with transformers' Auto classes.
"""

from matvlm.model.config import MaTVLMConfig, MixerSettings, mamba_layer_indices
from matvlm.model.convert import init_mixer_from_attention, summarize_conversion, to_hybrid
from matvlm.model.mixer import Mamba2Mixer
from matvlm.model.modeling import MaTVLMForConditionalGeneration, register_auto_classes

__version__ = "0.1.0"

register_auto_classes()

__all__ = [
    "MaTVLMConfig",
    "MaTVLMForConditionalGeneration",
    "Mamba2Mixer",
    "MixerSettings",
    "init_mixer_from_attention",
    "mamba_layer_indices",
    "summarize_conversion",
    "to_hybrid",
]
