"""GPU kernels for the scan, loaded lazily and only for CUDA tensors.

mamba_ssm's Triton chunk scan (`mamba_chunk_scan_combined`) runs forward and backward on Hopper with
the machine's triton. Its package `__init__` imports a CUDA extension that a source build without
nvcc does not have, so the Triton module is imported through a stub package entry. The CPU path never
comes here. Its one-token decode kernel fails to launch with triton 3.6 (see reference facts), so the
decode step stays in torch (and is captured in a CUDA graph by the engine).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from functools import lru_cache
from typing import Callable

BACKEND_ENV = "MATVLM_SSD_BACKEND"  # "auto" (default), "torch" or "mamba_ssm"


@lru_cache(maxsize=1)
def mamba_chunk_scan() -> Callable | None:
    """mamba_ssm's `mamba_chunk_scan_combined`, or None when mamba_ssm / triton are not installed."""
    if importlib.util.find_spec("triton") is None:
        return None
    spec = importlib.util.find_spec("mamba_ssm") if "mamba_ssm" not in sys.modules else None
    if "mamba_ssm" not in sys.modules:
        if spec is None or not spec.submodule_search_locations:
            return None
        stub = types.ModuleType("mamba_ssm")  # skips mamba_ssm/__init__.py and its CUDA extension
        stub.__path__ = list(spec.submodule_search_locations)
        sys.modules["mamba_ssm"] = stub
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError:
        return None
    return mamba_chunk_scan_combined


def scan_backend(device_type: str) -> str:
    """Which scan runs for tensors on `device_type`: "torch" or "mamba_ssm"."""
    choice = os.environ.get(BACKEND_ENV, "auto")
    if choice not in ("auto", "torch", "mamba_ssm"):
        raise ValueError(f"{BACKEND_ENV}={choice!r}: choose auto, torch or mamba_ssm")
    if device_type != "cuda" or choice == "torch":
        return "torch"
    if mamba_chunk_scan() is None:
        if choice == "mamba_ssm":
            raise RuntimeError(f"{BACKEND_ENV}=mamba_ssm but mamba_ssm's Triton kernels cannot be imported")
        return "torch"
    return "mamba_ssm"
