"""One module that holds the student and what is left of the teacher, and computes the distillation losses.

Everything the teacher and the student share (vision tower, embeddings, kept attention layers, all MLPs
and norms, lm_head) is frozen and identical, so it is stored once, in the student. The teacher keeps
only what differs: the attention modules of the layers that became mixers, and its connector when the
student's connector trains. The teacher pass runs the student's modules with those attention modules
swapped back in. Per batch:

    vision tower (once, frozen) -> teacher connector / student connector -> image embeddings
    teacher pass (no grad): final hidden states + input and output of every mixer layer
    student pass: final hidden states
    layer loss: each student mixer layer applied to the teacher's input of that layer (only those layers)
    logit losses: KL(teacher || student) at temperature T and CE, chunked through the shared lm_head
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration

from matvlm.model.modeling import MaTVLMForConditionalGeneration
from matvlm.distill.fused_loss import fused_logit_losses
from matvlm.distill.losses import LAYER_LOSS_FORMS, layer_loss, logit_losses

KL_POSITIONS = ("all", "text", "answer")


@dataclass
class LossSettings:
    alpha_layer: float = 1.0
    beta_kl: float = 1.0
    gamma_ce: float = 1.0  # the paper uses 0; the CE term on answer tokens is on by default (docs/distillation.md)
    temperature: float = 1.0
    layer_loss: str = "mse"  # mse (per-token mean) | frobenius (as released)
    kl_positions: str = "all"  # all (as released) | text (not image tokens) | answer (supervised tokens)
    normalize: str = "token"  # token: mean per position | sequence: sum per sequence (as released)
    logit_chunk: int = 1024
    logit_impl: str = "chunked"  # chunked: losses.logit_losses (any device) | liger: fused kernels (CUDA + liger-kernel)

    def check(self) -> None:
        if self.layer_loss not in LAYER_LOSS_FORMS:
            raise ValueError(f"layer_loss {self.layer_loss!r}: choose one of {', '.join(LAYER_LOSS_FORMS)}")
        if self.kl_positions not in KL_POSITIONS:
            raise ValueError(f"kl_positions {self.kl_positions!r}: choose one of {', '.join(KL_POSITIONS)}")
        if self.normalize not in ("token", "sequence"):
            raise ValueError(f"normalize {self.normalize!r}: choose token or sequence")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.logit_impl not in ("chunked", "liger"):
            raise ValueError(f"logit_impl {self.logit_impl!r}: choose chunked or liger")
        if min(self.alpha_layer, self.beta_kl, self.gamma_ce) < 0 or not (self.alpha_layer or self.beta_kl or self.gamma_ce):
            raise ValueError("loss weights must be >= 0 and at least one of alpha_layer, beta_kl, gamma_ce > 0")


def check_pair(teacher: LlavaForConditionalGeneration, student: MaTVLMForConditionalGeneration) -> None:
    """A student must be a conversion of this teacher: same shapes, and identical frozen weights."""
    if not isinstance(student, MaTVLMForConditionalGeneration) or not student.config.mamba_layers:
        raise ValueError("the student is not a hybrid: it has no mixer layers (convert the teacher first)")
    if getattr(teacher.config, "mamba_layers", None):
        raise ValueError("the teacher is itself a hybrid; distil from the original all-attention model")
    t_text, s_text = teacher.config.text_config, student.config.text_config
    for field in ("vocab_size", "num_hidden_layers", "hidden_size"):
        t, s = getattr(t_text, field), getattr(s_text, field)
        if t != s:
            raise ValueError(f"student and teacher do not match: text_config.{field} is {s} in the student, {t} in the teacher")
    prefixes = tuple(f"model.language_model.layers.{i}.self_attn." for i in student.config.mamba_layers)
    s_state = student.state_dict()
    differ = []
    for name, t in teacher.state_dict().items():
        if name.startswith(prefixes):
            continue
        s = s_state.get(name)
        if s is None or s.shape != t.shape:
            differ.append(f"{name} (missing or shape {None if s is None else tuple(s.shape)} vs {tuple(t.shape)})")
        elif name.startswith("model.multi_modal_projector."):
            continue  # a student may come from an earlier distillation that trained its connector
        elif not torch.equal(s.to(t.dtype), t):
            differ.append(f"{name} (values differ)")
    if differ:
        raise ValueError(
            f"the student was not converted from this teacher: {len(differ)} frozen tensors differ, e.g. "
            + "; ".join(differ[:4])
        )


class Distiller(nn.Module):
    def __init__(
        self,
        teacher: LlavaForConditionalGeneration,
        student: MaTVLMForConditionalGeneration,
        losses: LossSettings,
        train_connector: bool = True,
    ):
        super().__init__()
        check_pair(teacher, student)
        losses.check()
        self.student = student
        self.losses = losses
        # The layer loss alone never reaches the connector (it starts from the teacher's hidden states):
        # training it would leave parameters without gradients, which DDP rejects.
        self.train_connector = train_connector and (losses.beta_kl > 0 or losses.gamma_ce > 0)
        self.mixer_layers = list(student.config.mamba_layers)
        t_layers = teacher.model.language_model.layers
        # The teacher's own attention for each mixer layer, and its own connector when the student's trains.
        self.teacher_attention = nn.ModuleDict({str(i): t_layers[i].self_attn for i in self.mixer_layers})
        self.teacher_projector = copy.deepcopy(teacher.model.multi_modal_projector) if self.train_connector else None
        self.image_token_id = student.config.image_token_id
        for p in self.parameters():
            p.requires_grad_(False)
        for mixer in student.mixers().values():
            mixer.requires_grad_(True)
        if self.train_connector:
            student.model.multi_modal_projector.requires_grad_(True)
        self.train()

    # -- modes ------------------------------------------------------------------------------------------
    def trainable_modules(self) -> list[nn.Module]:
        mods = list(self.student.mixers().values())
        if self.train_connector:
            mods.append(self.student.model.multi_modal_projector)
        return mods

    def train(self, mode: bool = True) -> "Distiller":
        """Frozen modules always stay in eval mode (no dropout); only the trained ones follow `mode`."""
        super().train(False)
        self.training = mode
        for module in self.trainable_modules():
            module.train(mode)
        if mode and self.student.is_activation_checkpointing:
            # transformers checkpoints a decoder layer only when that layer's own flag says training;
            # set the flag on the layer alone, so its dropout children stay off.
            for layer in self.decoder_layers:
                layer.training = True
        return self

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.student.model.language_model.layers

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.student.named_parameters() if v.requires_grad}

    # -- pieces of the forward --------------------------------------------------------------------------
    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Frozen vision tower features before the connector, selected as Llava selects them."""
        cfg = self.student.config
        tower = self.student.model.vision_tower
        with torch.no_grad():
            out = tower(pixel_values.to(next(tower.parameters()).dtype), output_hidden_states=True)
            layers = cfg.vision_feature_layer if isinstance(cfg.vision_feature_layer, list) else [cfg.vision_feature_layer]
            picked = [out.hidden_states[i] for i in layers]
            if cfg.vision_feature_select_strategy == "default":
                picked = [h[:, 1:] for h in picked]
            return torch.cat(picked, dim=-1)

    def splice(self, embeds: torch.Tensor, input_ids: torch.Tensor, image_embeds: torch.Tensor | None) -> torch.Tensor:
        slots = input_ids == self.image_token_id
        n_slots = int(slots.sum())
        n_feats = 0 if image_embeds is None else image_embeds.shape[0] * image_embeds.shape[1]
        if n_slots != n_feats:
            raise ValueError(f"the batch has {n_slots} image tokens but its images give {n_feats} features")
        if image_embeds is None:
            return embeds
        return embeds.masked_scatter(slots[..., None], image_embeds.to(embeds.dtype).reshape(-1, embeds.shape[-1]))

    @contextmanager
    def teacher_attention_in_place(self) -> Iterator[None]:
        layers = self.decoder_layers
        mixers = {i: layers[i].self_attn for i in self.mixer_layers}
        try:
            for i in self.mixer_layers:
                layers[i].self_attn = self.teacher_attention[str(i)]
            yield
        finally:
            for i, mixer in mixers.items():
                layers[i].self_attn = mixer

    @contextmanager
    def capture_mixer_layers(self) -> Iterator[dict[int, dict]]:
        """Record (args, kwargs, output) of each mixer-position decoder layer during a forward."""
        seen: dict[int, dict] = {}
        handles = []
        for i in self.mixer_layers:
            layer = self.decoder_layers[i]

            def pre(module, args, kwargs, i=i):
                seen[i] = {"args": args, "kwargs": dict(kwargs)}

            def post(module, args, kwargs, output, i=i):
                seen[i]["output"] = output[0] if isinstance(output, tuple) else output

            handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(layer.register_forward_hook(post, with_kwargs=True))
        try:
            yield seen
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def teacher_pass(self, embeds, input_ids, attention_mask, feats) -> tuple[torch.Tensor, dict[int, dict]]:
        """The teacher's final hidden states, and the input / output of each mixer-position layer."""
        lm = self.student.model.language_model
        t_proj = self.teacher_projector if self.teacher_projector is not None else self.student.model.multi_modal_projector
        t_embeds = self.splice(embeds, input_ids, t_proj(feats) if feats is not None else None)
        with self.teacher_attention_in_place(), self.capture_mixer_layers() as seen:
            hidden = lm(inputs_embeds=t_embeds, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return hidden, seen

    # -- the losses -------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Loss sums over this micro-batch, plus the counts they are to be divided by (see `normalizers`)."""
        lm = self.student.model.language_model
        s = self.losses
        embeds = lm.get_input_embeddings()(input_ids)
        feats = self.vision_features(pixel_values) if pixel_values is not None else None
        s_proj = self.student.model.multi_modal_projector
        t_hidden, seen = self.teacher_pass(embeds, input_ids, attention_mask, feats)
        s_embeds = self.splice(embeds, input_ids, s_proj(feats) if feats is not None else None)

        valid = attention_mask.bool()
        parts: dict[str, torch.Tensor] = {}
        zero = t_hidden.new_zeros((), dtype=torch.float32)
        parts["layer"] = zero
        if s.alpha_layer > 0:
            total = zero
            for i in self.mixer_layers:
                rec = seen[i]
                out = self.decoder_layers[i](*rec["args"], **rec["kwargs"])
                out = out[0] if isinstance(out, tuple) else out
                total = total + layer_loss(out, rec["output"], valid, s.layer_loss)
            parts["layer"] = total

        parts["kl"], parts["ce"] = zero, zero
        if s.beta_kl > 0 or s.gamma_ce > 0:
            s_hidden = lm(inputs_embeds=s_embeds, attention_mask=attention_mask, use_cache=False).last_hidden_state
            kl_mask = self.kl_positions(input_ids, attention_mask, labels)
            targets = labels[:, 1:]
            if s.gamma_ce == 0:
                targets = torch.full_like(targets, -100)
            if s.beta_kl == 0:
                kl_mask = torch.zeros_like(kl_mask)
            logit_fn = fused_logit_losses if s.logit_impl == "liger" else logit_losses
            parts["kl"], parts["ce"] = logit_fn(
                self.student.lm_head,
                s_hidden[:, :-1].reshape(-1, s_hidden.shape[-1]),
                t_hidden[:, :-1].reshape(-1, t_hidden.shape[-1]),
                kl_mask.reshape(-1),
                targets.reshape(-1),
                s.temperature,
                s.logit_chunk,
            )
        return parts

    def kl_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(batch, seq-1) mask of the positions whose next-token distribution the KL compares."""
        nxt = attention_mask[:, 1:].bool()  # position t predicts token t+1, which must be real
        if self.losses.kl_positions == "all":
            return nxt
        if self.losses.kl_positions == "text":
            return nxt & (input_ids[:, 1:] != self.image_token_id) & (input_ids[:, :-1] != self.image_token_id)
        return labels[:, 1:] != -100

    def normalizers(self, attention_mask: torch.Tensor, labels: torch.Tensor, input_ids: torch.Tensor) -> dict[str, float]:
        """What each loss sum is divided by, for a whole (global) batch."""
        n_seq = float(attention_mask.shape[0])
        n_answer = float((labels[:, 1:] != -100).sum())
        if self.losses.normalize == "sequence":
            return {"layer": n_seq, "kl": n_seq, "ce": n_answer}
        per_token_layer = self.losses.layer_loss == "mse"
        return {
            "layer": float(attention_mask.sum()) * len(self.mixer_layers) if per_token_layer else n_seq,
            "kl": float(self.kl_positions(input_ids, attention_mask, labels).sum()),
            "ce": n_answer,
        }
