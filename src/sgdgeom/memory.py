"""How much memory a device has free: what the up-front checks of large allocations read
(the Gram matrix's spectrum, stored captures, a Krylov basis)."""

from __future__ import annotations

import torch

__all__ = ["available_bytes"]


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` in bytes (CUDA: ``mem_get_info``; CPU: ``MemAvailable`` of
    ``/proc/meminfo``), or None where it cannot be known."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
