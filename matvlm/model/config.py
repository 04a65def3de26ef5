"""Hybrid model configuration: which decoder layers are Mamba-2 mixers, and the mixers' settings.

The layer kinds live where transformers' caches look for them: `text_config.layer_types`, one of
"full_attention" (the teacher's attention, unchanged) or "linear_attention" (a Mamba-2 mixer). The
mixer settings live in `MaTVLMConfig.mamba_config` as a plain dict (saved in config.json).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from transformers import LlavaConfig

ATTENTION = "full_attention"
MIXER = "linear_attention"
PLACEMENTS = ("even", "begin", "middle", "end")


@dataclass
class MixerSettings:
    """Sizes and init choices of one Mamba-2 mixer (the same for every mixer layer of a model).

    Defaults follow the MaTVLM reference: expand 1 (inner width = attention width), one group per head,
    state size = head dim, conv kernel 4, chunk 256, no projection biases.
    """

    hidden_size: int
    num_heads: int
    head_dim: int
    num_groups: int
    state_size: int
    conv_kernel: int = 4
    chunk_size: int = 256
    conv_bias: bool = True
    in_proj_bias: bool = False
    out_proj_bias: bool = False
    norm_eps: float = 1e-5
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4
    A_init_range: tuple[float, float] = field(default=(1.0, 16.0))

    def __post_init__(self) -> None:
        # Refused here, at conversion, rather than by a ZeroDivisionError in the scan of a saved model.
        for name in ("hidden_size", "num_heads", "head_dim", "num_groups", "state_size", "conv_kernel", "chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"mixer setting {name} must be an integer >= 1, got {value!r}")
        if self.num_heads % self.num_groups:
            raise ValueError(f"mixer setting num_groups ({self.num_groups}) must divide num_heads ({self.num_heads})")
        if not 0 < self.dt_min <= self.dt_max or self.dt_init_floor < 0 or self.norm_eps <= 0:
            raise ValueError(f"mixer settings need 0 < dt_min <= dt_max, dt_init_floor >= 0 and norm_eps > 0; got "
                             f"dt_min={self.dt_min}, dt_max={self.dt_max}, dt_init_floor={self.dt_init_floor}, "
                             f"norm_eps={self.norm_eps}")
        low, high = self.A_init_range
        if not 0 < low <= high:
            raise ValueError(f"mixer setting A_init_range must satisfy 0 < low <= high, got {self.A_init_range}")

    @property
    def inner_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        """Channels the causal conv runs over: x | B | C."""
        return self.inner_size + 2 * self.num_groups * self.state_size

    @property
    def in_proj_size(self) -> int:
        """Rows of in_proj: z | x | B | C | dt."""
        return 2 * self.inner_size + 2 * self.num_groups * self.state_size + self.num_heads

    def to_dict(self) -> dict:
        d = asdict(self)
        d["A_init_range"] = list(self.A_init_range)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MixerSettings":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown mamba_config keys: {sorted(unknown)}; known: {sorted(known)}")
        d = dict(d)
        if "A_init_range" in d:
            d["A_init_range"] = tuple(d["A_init_range"])
        return cls(**d)


def mamba_layer_indices(num_layers: int, ratio: float, placement: str = "even") -> list[int]:
    """Which decoder layers become mixers for a fraction `ratio` of `num_layers`.

    even spreads them from layer 0 with a constant stride (32 layers: 12.5% -> [0, 8, 16, 24],
    25% -> [0, 4, ..., 28], 50% -> [0, 2, ..., 30]); begin / middle / end put them in one block.
    The paper found even spacing best and all-at-the-end failing to distil.
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    if placement.startswith("auto"):
        raise ValueError("placement auto chooses layers from a ranking of the teacher's layers; run `matvlm rank-layers` "
                         "and pass its file with --ranking")
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}; choose one of {', '.join(PLACEMENTS)} or auto (with --ranking)")
    count = round(num_layers * ratio)
    if count < 1:
        raise ValueError(f"ratio {ratio} of {num_layers} layers rounds to no mixer layer; raise the ratio")
    if count >= num_layers:
        raise ValueError(
            f"ratio {ratio} of {num_layers} layers would replace every attention layer; at least one must stay"
        )
    if placement == "even":
        return [i * num_layers // count for i in range(count)]
    if placement == "begin":
        start = 0
    elif placement == "end":
        start = num_layers - count
    else:
        start = (num_layers - count) // 2
    return list(range(start, start + count))


def check_layer_indices(layers: list[int], num_layers: int) -> list[int]:
    """Validate an explicit list of mixer layers; returns it sorted."""
    if not layers:
        raise ValueError("no mixer layer given")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"layer index {bad[0]} out of range: the decoder has layers 0..{num_layers - 1}")
    repeated = sorted({i for i in layers if layers.count(i) > 1})
    if repeated:
        raise ValueError(f"layer index {repeated[0]} is repeated in {layers}")
    if len(layers) == num_layers:
        raise ValueError(f"replacing all {num_layers} layers would leave no attention layer; keep at least one")
    return sorted(layers)


def layer_types_for(num_layers: int, mixer_layers: list[int]) -> list[str]:
    chosen = set(mixer_layers)
    return [MIXER if i in chosen else ATTENTION for i in range(num_layers)]


class MaTVLMConfig(LlavaConfig):
    """A Llava config plus the hybrid's mixer settings (`mamba_config`) and an optional lm_head bias.

    The mixer layers are those whose `text_config.layer_types` entry is "linear_attention".
    `lm_head_bias` exists because Phi-2 teachers (TinyLLaVA) have a bias on the output head that stock
    Llava cannot hold.
    """

    model_type = "matvlm"

    mamba_config: dict | None = None
    lm_head_bias: bool = False

    @property
    def mixer_settings(self) -> MixerSettings | None:
        return MixerSettings.from_dict(self.mamba_config) if self.mamba_config else None

    @property
    def mamba_layers(self) -> list[int]:
        types = getattr(self.text_config, "layer_types", None) or []
        return [i for i, t in enumerate(types) if t == MIXER]
