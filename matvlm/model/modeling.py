"""The hybrid model: a transformers Llava whose chosen decoder layers use a Mamba-2 mixer as `self_attn`.

One class for training and inference. Everything but the mixers is the teacher's own transformers code,
so teacher weights load without renaming and `generate()`, `save_pretrained` / `from_pretrained`,
gradient checkpointing and the Auto classes work as for any Llava. transformers' `DynamicCache` reads
`text_config.layer_types` and gives mixer layers a conv + SSM state instead of a KV cache.
"""

from __future__ import annotations

from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers import initialization as init

from matvlm.model.config import MaTVLMConfig
from matvlm.model.mixer import Mamba2Mixer, initial_ssm_values


class MaTVLMForConditionalGeneration(LlavaForConditionalGeneration):
    config_class = MaTVLMConfig
    config: MaTVLMConfig
    _is_stateful = True  # mixer states cannot be rolled back: no assisted / contrastive decoding

    def __init__(self, config: MaTVLMConfig):
        super().__init__(config)
        layers = self.model.language_model.layers
        if config.mamba_layers:
            settings = config.mixer_settings
            if settings is None:
                raise ValueError("text_config.layer_types names mixer layers but mamba_config is missing")
            for i in config.mamba_layers:
                layers[i].self_attn = Mamba2Mixer(settings, layer_idx=i)
        if config.lm_head_bias:
            text = config.text_config
            self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=True)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, Mamba2Mixer):
            # Only parameters not loaded from a checkpoint reach here (transformers' init guards).
            dt_bias, A_log = initial_ssm_values(module.settings)
            init.copy_(module.dt_bias, dt_bias)
            init.copy_(module.A_log, A_log)
            init.ones_(module.D)

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.model.language_model.layers

    def mixers(self) -> dict[int, Mamba2Mixer]:
        """Mixer modules by decoder layer index."""
        return {i: self.decoder_layers[i].self_attn for i in self.config.mamba_layers}

    def compile_layers(self, mode: str | None = None) -> None:
        """torch.compile each decoder layer and the vision tower, in place: the same modules and state_dict
        keys, so the distiller's shared weights, checkpoints and FSDP groups are unchanged. Fusing the
        element-wise work around the matmuls halved a 3.1B distillation step on an H100
        (docs/results.md). Lengths vary between batches: shapes become dynamic after a recompile.
        `mode`: torch.compile's (e.g. "reduce-overhead" adds CUDA graphs)."""
        compile_llava_layers(self, mode)

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, *, inputs_embeds=None, **kwargs):
        # Attention layers get the causal mask that transformers builds; mixers need the 2-D padding mask
        # of the tokens in this call so that left padding stays out of their conv and state.
        if self.config.mamba_layers and attention_mask is not None and attention_mask.dim() == 2:
            seqlen = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            current = attention_mask[:, -seqlen:]
            if seqlen > 1 and not bool(current.all()):
                kwargs["mixer_padding_mask"] = current
        return super().forward(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )


def compile_llava_layers(model: LlavaForConditionalGeneration, mode: str | None = None) -> None:
    """torch.compile each decoder layer and the vision tower of a Llava model, in place (same modules and
    state_dict keys). Per-layer graphs avoid tracing the whole model, whose output-capturing hooks break
    the graph and recompile per module type."""
    for layer in model.model.language_model.layers:
        layer.compile(mode=mode)
    model.model.vision_tower.compile(mode=mode)


def register_auto_classes() -> None:
    """After `import matvlm`, AutoConfig / AutoModelForImageTextToText / AutoProcessor know "matvlm"."""
    AutoConfig.register(MaTVLMConfig.model_type, MaTVLMConfig, exist_ok=True)
    AutoModelForImageTextToText.register(MaTVLMConfig, MaTVLMForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(MaTVLMConfig, LlavaProcessor, exist_ok=True)
