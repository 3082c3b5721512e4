"""Peak memory measured while training: the GPU's peak allocation on CUDA, the process's peak RSS on the CPU."""

from __future__ import annotations

import resource
import sys

PEAK_MEMORY_METRIC = "peak_memory_bytes"  # on a training's MLflow run


def reset_peak_memory(device: str) -> None:
    """Start measuring now (CUDA); the CPU's figure is the process's peak so far and cannot be reset."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: str) -> int:
    """Peak GPU memory allocated since ``reset_peak_memory`` on CUDA; on the CPU the process's peak resident memory."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.max_memory_allocated())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
