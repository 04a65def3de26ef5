"""`matvlm serve`: load a model directory and run the API with uvicorn."""

from __future__ import annotations

from pathlib import Path

from matvlm.serve.app import create_app
from matvlm.serve.model import ServedModel


def serve_command(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8,
                  max_seq_len: int = 2048, max_queue: int = 64, request_timeout_s: float = 600.0,
                  device: str | None = None, dtype: str | None = None, name: str | None = None,
                  log_level: str = "info") -> None:
    """Serve a teacher or hybrid directory until interrupted. Raises ValueError / OSError for a bad model
    directory or setting before anything listens."""
    import uvicorn

    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"model directory {model_dir} not found")
    if max_queue < 0 or request_timeout_s <= 0:
        raise ValueError("max_queue must be >= 0 and request_timeout_s > 0")
    served = ServedModel.load(model_dir, max_batch=max_batch, max_seq_len=max_seq_len, max_queue=max_queue,
                              device=device, dtype=dtype, name=name)
    uvicorn.run(create_app(served, request_timeout_s), host=host, port=port, log_level=log_level)
