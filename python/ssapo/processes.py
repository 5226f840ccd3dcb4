"""The processes of a step, and how they share work and results.

`procs` is accelerate's `PartialState` inside a launch, or `Solo()` (one
process, the driver): anything with is_main_process, process_index,
num_processes, device and wait_for_everyone(). Work is shared out in chunks
of consecutive items (chunk c to process c mod world), so every chunk is one
batch whatever the process count and the results do not depend on it; results
are exchanged through small JSON files in the step's directory (no collective
that could time out on a long, uneven share).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional


class Solo:
    """The processes of a one-process run (the driver): rank 0 of 1."""

    is_main_process = True
    process_index = 0
    num_processes = 1
    device = None

    def wait_for_everyone(self) -> None:
        pass


def write_ordered(path: str, obj: Any) -> None:
    """JSON with the keys in their own order (rows merged from processes are written as one process writes them)."""
    from ssapo.io import _jsonable, atomic_write

    def w(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, default=_jsonable)

    atomic_write(path, w)


def exchange(procs, d: str, name: str, obj: Any) -> List[Any]:
    """Every process's `obj` (JSON), in rank order, on every process (through files in `d`)."""
    procs = procs if procs is not None else Solo()
    if procs.num_processes == 1:
        return [obj]
    write_ordered(os.path.join(d, f".{name}.rank_{procs.process_index}.json"), obj)
    procs.wait_for_everyone()
    parts = []
    for r in range(procs.num_processes):
        with open(os.path.join(d, f".{name}.rank_{r}.json")) as f:
            parts.append(json.load(f))
    procs.wait_for_everyone()
    if procs.is_main_process:
        for r in range(procs.num_processes):
            os.remove(os.path.join(d, f".{name}.rank_{r}.json"))
    return parts


def chunks_of(n: int, bs: int, rank: int = 0, world: int = 1) -> List[int]:
    """The indices of the chunks (of `bs` consecutive items out of n) that process `rank` of `world` takes:
    chunk c to process c mod world, the one rule every shared-out step follows."""
    return list(range(rank, (n + bs - 1) // bs, world))


def chunked(n: int, bs: int, procs=None) -> List[range]:
    """This process's share of n items, as chunks of `bs` consecutive items (chunk c to process c mod world)."""
    world, rank = (procs.num_processes, procs.process_index) if procs is not None else (1, 0)
    return [range(c * bs, min((c + 1) * bs, n)) for c in chunks_of(n, bs, rank, world)]


def merge_counts(parts: List[dict]) -> dict:
    """Per-process counters summed (strings, e.g. a backend's name, kept as they are)."""
    total: dict = {}
    for part in parts:
        for k, v in part.items():
            total[k] = v if isinstance(v, str) else total.get(k, 0) + v
    return total


def gather_strings(procs, value: str) -> List[str]:
    """`value` of every process, in rank order."""
    if procs.num_processes == 1:
        return [value]
    from accelerate.utils import gather_object

    return list(gather_object([value]))


def broadcast_from_main(obj):
    """`obj` as the main process has it, on every process."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    box = [obj if PartialState().is_main_process else None]
    broadcast_object_list(box, from_process=0)
    return box[0]


def process_group_timeout() -> Optional[float]:
    """Seconds the default process group's collectives wait (None: no group, or not readable)."""
    try:
        import torch
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            return None
        device = torch.device("cuda" if "nccl" in str(dist.get_backend()) else "cpu")
        return float(dist.group.WORLD._get_backend(device).options._timeout.total_seconds())
    except Exception:  # a backend without readable options (mpi, ucc): nothing to report
        return None


# -- what a step costs: each process measures itself ----------------------------------------------------


def _vm_hwm() -> Optional[int]:
    """This process's peak resident memory in bytes since the last `reset_peak_memory` (Linux VmHWM)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # the process's whole life
    except (ImportError, OSError):
        return None


def reset_peak_memory() -> None:
    """Starts this process's peak-memory count anew: the GPU allocator's peak (torch.cuda) and the
    resident peak (Linux: writing 5 to /proc/self/clear_refs resets VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> Dict[str, Optional[int]]:
    """This process's peaks since `reset_peak_memory`: `device_bytes` (the most torch's CUDA allocator
    held on this process's GPU; None without a GPU; vLLM's engine, a process of its own, is not in it)
    and `resident_bytes` (host memory)."""
    import torch

    device = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        device = int(torch.cuda.max_memory_allocated())
    return {"device_bytes": device, "resident_bytes": _vm_hwm()}
