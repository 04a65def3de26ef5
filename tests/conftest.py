import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from matvlm.testing import tiny_llava


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is several times faster than two on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=["phi", "llama"])
def family(request):
    return request.param


@pytest.fixture
def teacher(family):
    return tiny_llava(family)


def make_prompt(config, text_ids, image=True, seed=0):
    """input_ids (1, L) with a block of image tokens after a BOS, and matching pixel_values."""
    gen = torch.Generator().manual_seed(seed)
    ids = [config.text_config.bos_token_id]
    if image:
        ids += [config.image_token_index] * config.image_seq_length
    ids += list(text_ids)
    size = config.vision_config.image_size
    pixels = torch.randn(1, 3, size, size, generator=gen) if image else None
    return torch.tensor([ids]), pixels


def greedy_no_cache(model, input_ids, pixel_values, steps, banned):
    """Reference decoding: full forward over the whole sequence at every step, no cache."""
    ids = input_ids
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=pixel_values, use_cache=False).logits[:, -1]
        logits[:, banned] = float("-inf")
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids[:, input_ids.shape[1]:]


def load_benchmark(name: str):
    """A script of benchmarks/ (not a package) as a module, e.g. load_benchmark("epoch_projection")."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_on_cpu(n: int, argv: list[str], timeout: int = 300, cwd=None) -> subprocess.CompletedProcess:
    """`accelerate launch` of `argv` (a script and its arguments) as n CPU processes. `--cpu` starts ONE process
    whatever --num_processes says, so n > 1 goes through torchrun (--multi_gpu), with ACCELERATE_USE_CPU for gloo."""
    mode = ["--multi_gpu"] if n > 1 else ["--cpu"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(n),
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port())]  # not the default: other runs may hold it
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([*launch, *argv], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def world_and_teacher(tmp_path_factory):
    """A tiny world and a tiny trained teacher (real tokenizer with <image>, processor, template): what the tests
    of refused inputs and outputs run commands on; a few seconds to build."""
    from matvlm.synthetic.teacher import TeacherConfig, train_teacher
    from matvlm.synthetic.world import generate_world

    root = tmp_path_factory.mktemp("reliability")
    world, teacher = root / "world", root / "teacher"
    generate_world(world, n_train=12, n_test=9, seed=2, image_size=64)
    train_teacher(TeacherConfig(
        data=str(world), out=str(teacher), vocab_size=400, image_size=64, patch_size=16, vision_hidden=32,
        vision_layers=2, vision_heads=2, hidden=32, layers=2, heads=2, intermediate=64, max_length=1024,
        batch_size=4, steps=2, eval_every=0, save_every=2, num_workers=0, final_eval_records=1, save_dtype="float32",
    ), progress=False)
    return world, teacher
