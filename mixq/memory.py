"""Resident memory: what glibc and the kernel would otherwise keep after a stage is done with it."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap

import torch

MADV_DONTNEED = 4
M_MMAP_THRESHOLD = -3


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()
if _LIBC is not None and hasattr(_LIBC, "mallopt"):
    # Tensors of 64 MiB and more get their own mapping, returned to the OS when freed: glibc would
    # otherwise raise this threshold after the first large free and serve later large tensors from
    # a heap that fragments. Smaller ones (activations, logits chunks) stay on the heap, which
    # `release_memory` trims: mapping each of those afresh costs ~15% of quantization time.
    _LIBC.mallopt(M_MMAP_THRESHOLD, 64 << 20)


def release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise, and a block's temporaries,
    freed but kept, would add up across blocks to far more than one block's worth)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def release_tail(t: torch.Tensor, used_bytes: int) -> None:
    """Give the pages of `t`'s memory past its first `used_bytes` back to the system while `t` lives
    on (its values there become zeros): for a tensor whose contents were narrowed in place into
    its first part. Only whole pages inside the tensor are released."""
    if _LIBC is None or not hasattr(_LIBC, "madvise"):
        return
    start = t.data_ptr() + used_bytes
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (t.data_ptr() + t.numel() * t.element_size()) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > first:
        _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(end - first), MADV_DONTNEED)


def available_bytes(device: torch.device) -> int:
    """Memory free for new tensors on `device`: the kernel's MemAvailable for the CPU (0 where it
    cannot be read), the driver's free memory for CUDA."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0
