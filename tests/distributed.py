"""Running a test body in 2 gloo processes on the CPU (loopback only)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def spawn(worker: Callable[..., None], tmp_path: Path, *args: object, world: int = 2) -> None:
    """Run ``worker(rank, world, *args)`` in ``world`` spawned processes, each already in a
    gloo process group (rendezvous through a file in ``tmp_path``)."""
    import torch.multiprocessing as mp

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # never look for another interface
    mp.start_processes(
        _run,
        args=(world, str(tmp_path / "rendezvous"), worker, args),
        nprocs=world,
        join=True,
        start_method="spawn",
    )


def _run(rank: int, world: int, path: str, worker: Callable[..., None], args: tuple) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        worker(rank, world, *args)
    finally:
        dist.destroy_process_group()
