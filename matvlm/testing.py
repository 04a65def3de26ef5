"""Tiny random LLaVA teachers built from configs: for tests and for trying the tools offline.

Two LM architectures, as the method needs to support both:
- "phi":   SigLIP-style vision (no CLS token, all patches kept) + Phi LM (partial rotary, MHA, biases),
           the shape of TinyLLaVA-Phi-2-SigLIP;
- "llama": CLIP-style vision (CLS token dropped, "default" strategy) + Llama LM with GQA,
           the shape of LLaVA-1.5.
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PhiConfig,
    SiglipVisionConfig,
)

FAMILIES = ("phi", "llama")


def tiny_llava_config(
    family: str = "phi",
    *,
    vocab_size: int = 128,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    image_size: int = 32,
    patch_size: int = 8,
    max_positions: int = 512,
) -> LlavaConfig:
    image_token = vocab_size - 1
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    patches = (image_size // patch_size) ** 2
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=patch_size,
    )
    if family == "phi":
        text = PhiConfig(**common, num_key_value_heads=num_kv_heads or num_heads, partial_rotary_factor=0.5)
        vision_config = SiglipVisionConfig(**vision)
        strategy, image_tokens = "full", patches
    elif family == "llama":
        text = LlamaConfig(**common, num_key_value_heads=num_kv_heads or max(1, num_heads // 2))
        vision_config = CLIPVisionConfig(**vision, projection_dim=32)
        strategy, image_tokens = "default", patches  # CLS + patches, CLS dropped
    else:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(FAMILIES)}")
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text,
        image_token_index=image_token,
        image_seq_length=image_tokens,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=-2,
    )


def tiny_llava(family: str = "phi", seed: int = 0, **kwargs) -> LlavaForConditionalGeneration:
    """A tiny random Llava teacher in eval mode (weights depend on the torch version, not only the seed)."""
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_llava_config(family, **kwargs))
    return model.eval()
