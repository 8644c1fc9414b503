"""Process-group setup from torchrun's environment, and the few collectives the loop needs."""
from __future__ import annotations

import ctypes
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_host_group: dist.ProcessGroup | None = None  # gloo, for host values, when the default group is NCCL


def init_distributed(device: str = "auto", timeout_minutes: float = 30) -> World:
    """Join the process group torchrun describes; a plain `python` run becomes a group of one.

    A group of one is still a real (gloo/nccl) group so the same FSDP2 and DCP code runs everywhere.
    """
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():  # a GPU node that lost its GPUs: fail, never fall back
        raise RuntimeError(f"device=cuda, but CUDA is not available on {socket.gethostname()} "
                           "(a driver or GPU fault?); its peers would otherwise wait for it in NCCL")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    else:
        keep_freed_host_memory()
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # one process without torchrun: a MASTER_* left in the shell is not ours
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size,
                                timeout=timedelta(minutes=timeout_minutes),
                                device_id=dev if use_cuda else None)
    mesh = init_device_mesh(dev.type, (world_size,))
    global _host_group
    # Host-side flags agreed over NCCL would make the host wait for the GPU's whole step (the
    # .tolist()) every step, so it could never queue the next step ahead: a gloo group keeps them on
    # the CPU. (Separate from the async checkpoint's group, whose collectives run in another thread.)
    _host_group = dist.new_group(backend="gloo") if use_cuda and world_size > 1 else None
    return World(rank, world_size, local_rank, dev, mesh)


GLIBC_MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_host_memory() -> None:
    """On CPU, let glibc keep freed memory for reuse instead of handing it back to the OS.

    FSDP2 allocates and frees its all-gather and reduce-scatter buffers (a whole unit each) and the
    gradients on every step. glibc serves blocks over its mmap threshold (at most 32 MB) as fresh
    mappings and trims the top of the heap, so the same memory was page-faulted again every step:
    ~1 GB of faults per ViT-B step, which made its copies 30x slower than in a warm buffer. CUDA has
    its caching allocator; this is the CPU's equivalent (what PyTorch's CPU launcher gets from
    jemalloc/tcmalloc). An explicit glibc setting in the environment wins.
    """
    if any(k in os.environ for k in GLIBC_MALLOC_ENV):
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    mallopt(m_mmap_max, 0)
    mallopt(m_trim_threshold, -1)  # -1: never trim


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_reduce_max(values: list[int]) -> list[int]:
    """Agree on host-side flags across ranks (a rank that saw a stop signal makes every rank stop),
    on the CPU: no wait for the GPU."""
    t = torch.tensor(values, dtype=torch.int32)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_host_group)
    return t.tolist()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (picklable; for small control data only)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def close() -> None:
    """Leave the process group together: a rank that tears down gloo while a peer is still in its
    last collective can abort at exit ("terminate called without an active exception")."""
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()
