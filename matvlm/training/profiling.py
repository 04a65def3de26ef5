"""Profile a window of training steps from inside a long run, so a GPU lease spent training also says where
its step time goes (kernel time vs launches and Python) without a separate call."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.autograd import DeviceType


def quiet_window_start(start: int, periods: list[int], steps: int = 10) -> int:
    """The first step >= `start` whose window of `steps` steps holds no checkpoint or evaluation (steps that are
    multiples of a period). The loop profiles steps start..start+steps-1 and the work after each but the last, so a
    save or held-out evaluation there would be counted as step time."""
    if start <= 0:
        return start
    periods = [p for p in periods if p > 0]
    if any(p < steps for p in periods):  # no window of that length avoids them: keep the one asked for
        return start
    while any(s % p == 0 for s in range(start, start + steps - 1) for p in periods):
        start += 1
    return start


class StepProfiler:
    """Profiles steps `start` .. `start + steps - 1` (1-based, as a loop counts finished steps; cut at `last`,
    the run's final step, so that a window near the end still closes) and writes a summary line and the top
    operators to `path`. Call `begin(n)` before step n runs and `end(n)` after; `end` returns the summary
    at the step that closes the window, else None."""

    def __init__(self, start: int, path: str | Path, steps: int = 10, last: int | None = None):
        self.start, self.path = start, Path(path)
        self.stop = start + steps - 1 if last is None else min(start + steps - 1, last)
        self.profile: torch.profiler.profile | None = None
        self.began = 0.0

    def begin(self, step: int) -> None:
        if self.start <= 0 or step != self.start:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize()
        self.profile = torch.profiler.profile(activities=activities)
        self.profile.start()
        self.began = time.perf_counter()

    def end(self, step: int) -> dict | None:
        if self.profile is None or step != self.stop:
            return None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.began
        self.profile.stop()
        events = self.profile.key_averages()
        n = self.stop - self.start + 1
        # Kernel time summed over the window: the share of the step the GPU was busy (streams may overlap).
        device_us = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA)
        kernels = sum(e.count for e in events if e.device_type == DeviceType.CUDA)
        summary = {
            "steps": [self.start, self.stop],
            "step_ms": round(1e3 * wall / n, 2),
            "gpu_kernel_ms_per_step": round(device_us / 1e3 / n, 2),
            "gpu_busy": round(device_us / 1e6 / wall, 3) if wall else 0.0,
            "kernels_per_step": round(kernels / n, 1),
        }
        # By host time too: a small model's step is often bound by the host (GPU busy as little as 10%).
        sorts = ([("by GPU time", "self_cuda_time_total")] if device_us else []) + [("by host time", "self_cpu_time_total")]
        tables = "".join(f"\n{title}\n{events.table(sort_by=key, row_limit=30, max_name_column_width=60)}\n"
                         for title, key in sorts)
        self.path.write_text(f"{summary}\n{tables}")
        self.profile = None
        return summary
