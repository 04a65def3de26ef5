"""A run's log: log.csv (always) and TensorBoard events (when tensorboard is installed), by the main process."""

from __future__ import annotations

from pathlib import Path

from matvlm.io import write_text_atomic


class RunLog:
    def __init__(self, run_dir: Path, columns: list[str], enabled: bool):
        self.path, self.columns, self.enabled = run_dir / "log.csv", columns, enabled
        self.tensorboard = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional
                pass

    def add(self, row: list) -> None:
        if self.tensorboard is not None:
            for name, value in zip(self.columns[1:], row[1:]):
                self.tensorboard.add_scalar(f"train/{name}", value, row[0])

    def write(self, history: list[list]) -> None:
        """The whole log so far, written with the checkpoint that holds the same rows."""
        if self.enabled:
            lines = [",".join(self.columns)] + [",".join(map(str, row)) for row in history]
            write_text_atomic(self.path, "\n".join(lines) + "\n")

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_log(path: str | Path) -> list[dict[str, float]]:
    """The rows of a log.csv as {column: value}."""
    lines = Path(path).read_text().splitlines()
    if not lines:
        return []
    columns = lines[0].split(",")
    return [dict(zip(columns, map(float, line.split(",")))) for line in lines[1:] if line]
