"""FSDP2 (torch `fully_shard`) for the distiller, and the full-tensor views that checkpoints need.

The distiller is sharded in groups that follow how its forward uses them, so that no group mixes what
trains (fp32) with what is frozen (the run dtype), and each group is gathered only while it runs:

    each mixer (fp32, trains)                   its own group: gathered in the layer loss and the student pass
    each teacher attention module (frozen)      its own group: gathered only in the teacher pass, when it is
                                                swapped into its decoder layer (on every rank alike)
    the student connector, when it trains       its own group
    each vision encoder layer (frozen)          its own group (not the tower as a whole: transformers finds
                                                which outputs a model can record by its class, which
                                                fully_shard replaces; its layers keep theirs as subclasses)
    each decoder layer (frozen rest)            its own group
    the root (the Distiller)                    embeddings, norms, lm_head, teacher connector

Checkpoints and the final model hold full tensors, gathered from every rank and written by rank 0, in
the same layout as an unsharded run's (matvlm.training.checkpoint): a run can resume under the other sharding.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

SHARDINGS = ("auto", "ddp", "fsdp2")


@dataclass
class Launcher:
    """What `accelerate launch` asked for: FSDP (and its version) or not, and the FSDP options we honour."""

    fsdp_version: int | None = None  # None: no --use_fsdp
    reshard_after_forward: bool = True


def launcher_settings() -> Launcher:
    """Read from the environment `accelerate launch --use_fsdp ...` (or an accelerate config) sets.

    Read there rather than from `Accelerator().state.fsdp_plugin` because accelerate drops the plugin on
    the CPU; the environment says the same on every device.
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return Launcher()
    for name, hint in (("FSDP_OFFLOAD_PARAMS", "CPU offload is not supported here"),
                       ("FSDP_ACTIVATION_CHECKPOINTING", "use --gradient-checkpointing instead")):
        if os.environ.get(name, "false").lower() == "true":
            raise ValueError(f"accelerate launch set {name}: {hint}")
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"
    return Launcher(fsdp_version=int(os.environ.get("FSDP_VERSION", "1")), reshard_after_forward=reshard)


def resolve_sharding(requested: str, launcher: Launcher) -> str:
    """'ddp' or 'fsdp2'. `auto` follows the launcher: FSDP2 under `accelerate launch --use_fsdp
    --fsdp_version 2`, else DDP (one process: nothing to distribute)."""
    if requested not in SHARDINGS:
        raise ValueError(f"sharding {requested!r}: choose one of {', '.join(SHARDINGS)}")
    if launcher.fsdp_version not in (None, 2):
        raise ValueError(f"accelerate launch asked for FSDP version {launcher.fsdp_version}; the distiller "
                         "shards itself with FSDP2: pass --fsdp_version 2")
    if requested == "ddp" and launcher.fsdp_version == 2:
        raise ValueError("sharding is 'ddp' but accelerate launch asked for FSDP2 (--use_fsdp): drop one of them")
    if requested == "auto":
        return "fsdp2" if launcher.fsdp_version == 2 else "ddp"
    return requested


def load_weights_everywhere() -> None:
    """Under `accelerate launch --use_fsdp`, transformers may load real weights in the first process only
    (accelerate's RAM-efficient loading, completed by a broadcast in accelerate's own FSDP preparation).
    The distiller shards every process's own full copy instead, so every process loads the weights."""
    os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"


def shard_distiller(distiller: nn.Module, device: torch.device, reshard_after_forward: bool = True) -> None:
    """Apply `fully_shard` in place, bottom-up (see the module docstring for the groups).

    Every rank must hold the same full weights (same teacher, same seed); each keeps its shard and moves
    it to `device`. Build the optimizer afterwards: the parameters become new (DTensor) objects.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # The warning is about writing into a module's output in place, which the distiller never does.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    *inner, root = shard_groups(distiller)
    for module in inner:
        fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(root, mesh=mesh)  # root: not resharded after forward, its backward follows at once
    # A trained tensor without a gradient on one rank (e.g. the connector on a micro-batch without images)
    # must still join the reduce-scatter, or the ranks' collectives differ.
    if hasattr(distiller, "set_reduce_scatter_unused_params"):  # recent torch only
        distiller.set_reduce_scatter_unused_params(True)
    # Evaluation runs on every rank: transformers' generate() sees this flag and keeps the ranks stepping
    # together (synced_gpus) until all are done, should their answers differ in length.
    distiller.student._is_fsdp_managed_module = True


def shard_groups(distiller: nn.Module) -> list[nn.Module]:
    """The modules that become FSDP2 groups (see the module docstring), inner ones first, the root last.
    A group owns the parameters of its module that no earlier group owns; FSDP2 needs them in one dtype."""
    student = distiller.student
    groups: list[nn.Module] = []
    for i, mixer in student.mixers().items():
        groups += [mixer, distiller.teacher_attention[str(i)]]
    if distiller.train_connector:
        groups.append(student.model.multi_modal_projector)
    groups += _vision_layers(student.model.vision_tower)
    groups += list(distiller.decoder_layers)
    return groups + [distiller]


def _vision_layers(tower: nn.Module) -> list[nn.Module]:
    """The encoder layers of a vision tower (CLIP, SigLIP: `encoder.layers`, wherever it is nested)."""
    for name, module in tower.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-2:] == ["encoder", "layers"]:
            return list(module)
    return []  # an unknown layout stays in the root group: correct, only less memory saved


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextmanager
def root_unsharded(distiller: nn.Module) -> Iterator[None]:
    """Gather the root group for code that calls the student directly (evaluation); the other groups
    gather themselves as their modules run. Every rank must run the same calls inside."""
    if not is_sharded(distiller):
        yield
        return
    distiller.unshard()
    try:
        yield
    finally:
        distiller.reshard()
