"""GPU scan kernel vs the float64 recurrence. Run on the GPU machine: pytest -m gpu tests/model/test_gpu_kernels.py"""

import os

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def need_cuda_and_kernels():
    from matvlm.model import kernels

    if not torch.cuda.is_available() or kernels.mamba_chunk_scan() is None:
        pytest.skip("needs CUDA and mamba_ssm's Triton kernels")
    os.environ[kernels.BACKEND_ENV] = "mamba_ssm"
    yield
    os.environ.pop(kernels.BACKEND_ENV)


# float32 inputs still run Triton dots in tf32: measured 3e-5 on y, up to 3.3e-3 on the gradients of dt, A, B, C.
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 5e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("shape", [(2, 300, 32, 32, 80, 80, 256), (1, 777, 8, 2, 64, 128, 256), (3, 100, 4, 4, 80, 80, 64)])
def test_kernel_matches_recurrence(shape, dtype, tol):
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
    from ssd_kernels import check

    errors = check(shape, dtype, seed=7)
    bad = {k: v for k, v in errors.items() if not v < tol}
    assert not bad, bad


def test_auto_backend_picks_kernel_for_cuda_only():
    from matvlm.model import kernels

    os.environ[kernels.BACKEND_ENV] = "auto"
    assert kernels.scan_backend("cuda") == "mamba_ssm"
    assert kernels.scan_backend("cpu") == "torch"
