"""Live servers for the serve tests: the shipped teacher and a hybrid made from it, each run by uvicorn in a
thread of the test process on a free loopback port."""

import base64
import io
import threading
import time

import httpx
import pytest
import uvicorn
from PIL import Image, ImageDraw
from transformers import AutoTokenizer

import matvlm
from matvlm.synthetic import SHIPPED_TEACHER
from matvlm.io import load_image_processor, load_vlm
from matvlm.serve import ServedModel, create_app

from ..conftest import free_port

TEACHER = str(SHIPPED_TEACHER)


class LiveServer:
    def __init__(self, served: ServedModel, request_timeout_s: float = 120.0):
        self.served = served
        self.app = create_app(served, request_timeout_s)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)

    def idle(self, timeout: float = 60.0) -> bool:
        """Wait until no request runs or waits (a cancelled one leaves within a round)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stats = self.served.scheduler.stats()
            if stats.running == 0 and stats.waiting == 0:
                return True
            time.sleep(0.05)
        return False


def served_model(kind: str, max_batch: int = 4, max_queue: int = 16) -> ServedModel:
    model = load_vlm(TEACHER)
    if kind == "hybrid":
        model = matvlm.to_hybrid(model, ratio=0.5).eval()
    return ServedModel(model, AutoTokenizer.from_pretrained(TEACHER), load_image_processor(TEACHER), "phi_short",
                       name=kind, max_batch=max_batch, max_seq_len=256, max_queue=max_queue)


@pytest.fixture(scope="package")
def teacher_server():
    with LiveServer(served_model("teacher")) as live:
        yield live


@pytest.fixture(scope="package")
def hybrid_server():
    with LiveServer(served_model("hybrid")) as live:
        yield live


@pytest.fixture(params=["teacher", "hybrid"])
def server(request):
    return request.getfixturevalue(f"{request.param}_server")


@pytest.fixture
def client():
    with httpx.Client(timeout=120) as c:
        yield c


def scene_png(seed: int = 0, size: int = 128) -> bytes:
    """A small picture of coloured shapes on a plain background, as PNG bytes."""
    im = Image.new("RGB", (size, size), (245, 245, 220))
    draw = ImageDraw.Draw(im)
    colours = [(220, 30, 30), (30, 90, 220), (30, 170, 60), (240, 200, 20)]
    for k in range(1 + seed % 3):
        x, y = 10 + 40 * k, 20 + 25 * ((seed + k) % 3)
        box = (x, y, x + 30, y + 30)
        (draw.ellipse if (seed + k) % 2 else draw.rectangle)(box, fill=colours[(seed + k) % 4])
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def image_message(question: str, png: bytes | None = None) -> dict:
    if png is None:
        return {"role": "user", "content": question}
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png)}},
                                        {"type": "text", "text": question}]}
