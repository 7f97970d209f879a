"""Performance measurements shared by training and the benchmarks: peak memory and matmul peak."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch


def significant(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant digits (tiny figures such as an 8-bit KL of 1e-6 stay visible)."""
    return float(f"{x:.{digits}g}")


def reset_peak_memory(device: torch.device | str) -> None:
    """Start a new peak: CUDA allocator statistics, or VmHWM (Linux ``clear_refs``) on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mb(device: torch.device | str) -> float:
    """This process's peak memory so far: CUDA allocator peak on a GPU, peak RSS (VmHWM) on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(_rss("VmHWM") / 2**20, 1)


def matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 3.0) -> tuple[float, str]:
    """Best FLOP/s over square and LM-shaped matmuls (the shapes a training step runs)."""
    shapes = [(2048, 2048, 2048), (1024, 1024, 1024), (640, 576, 1536), (640, 1536, 576), (4096, 576, 576)]
    best, best_shape = 0.0, ""
    per_shape = seconds / len(shapes)
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        for _ in range(3):
            a @ b
        sync(device)
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < per_shape:
            a @ b
            reps += 1
        sync(device)
        rate = 2 * m * k * n * reps / (time.perf_counter() - start)
        if rate > best:
            best, best_shape = rate, f"{m}x{k}x{n}"
    return best, best_shape


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0
