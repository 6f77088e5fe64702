"""A step's host arrays copied to the GPU in one transfer from pinned memory.

Why: every step sends the batch's index arrays and attention masks to the device (``batch.py``:
five arrays, four to six more per attention group; the commit's K/V slot lists; the graph runner's row
map). Each ``torch.from_numpy(a).to("cuda")`` from pageable memory is a synchronous copy through
the driver's bounce buffer, tens of microseconds each and slower per byte than a pinned copy. Here
the arrays are packed into one pinned host buffer and sent with one asynchronous copy; the device
tensors are views of the one device buffer (issue 12: host work per iteration on a GPU).

Host buffers are reused round-robin; before one is overwritten the copy that read it last must be
done (a CUDA event), which in practice it long is. On the CPU nothing is copied (``to_device``
returns zero-copy tensors), unless ``Staging(..., force=True)`` packs anyway (tests).
``ADASERVE_STAGING=0`` copies each array by itself, as before; where pinned memory cannot be had
(a container's locked-memory limit), the buffers are pageable, with a warning, and still one copy.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import numpy as np
import torch

from adaserve.core.environment import env_switch

log = logging.getLogger("adaserve.engine")
STAGING_ENV = "ADASERVE_STAGING"

ALIGN = 16  # bytes: every array starts at a multiple, so views of any dtype are aligned
RING = 4  # host buffers in turn


@functools.cache
def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype)).dtype


class Staging:
    """``to_device(arrays)``: the numpy arrays as tensors on ``device``, in one copy."""

    def __init__(self, device: str | torch.device, force: bool = False):
        self.device = torch.device(device)
        setting = env_switch(STAGING_ENV, "one packed copy per step", "one copy per array", "packed on a GPU")
        self.packs = force or (self.device.type != "cpu" and setting is not False)
        self._pin = self.device.type == "cuda"
        self._host = [torch.empty(0, dtype=torch.uint8) for _ in range(RING)]
        self._done: list = [None] * RING
        self._turn = 0
        self.copies = 0

    def serves(self, device: torch.device) -> bool:
        """Whether tensors for ``device`` can come from here ("cuda" names the current device)."""
        return device.type == self.device.type and device.index in (None, self.device.index)

    def to_device(self, arrays: Sequence[np.ndarray]) -> list[torch.Tensor]:
        if not self.packs:  # one copy per array (none on the CPU)
            return [torch.from_numpy(np.ascontiguousarray(a)).to(self.device) for a in arrays]
        arrays = [np.ascontiguousarray(a) for a in arrays]
        offsets, total = [], 0
        for a in arrays:
            offsets.append(total)
            total += -(-a.nbytes // ALIGN) * ALIGN
        host = self._buffer(total)
        flat = host.numpy()
        for a, at in zip(arrays, offsets):
            flat[at:at + a.nbytes] = a.reshape(-1).view(np.uint8)
        dev = host[:total].to(self.device, non_blocking=self._pin)
        if dev.data_ptr() == host.data_ptr():  # forced on the CPU: no copy was made, and the buffer is reused
            dev = dev.clone()
        if self._pin:
            event = torch.cuda.Event()
            event.record()
            self._done[self._turn] = event
        self.copies += 1
        return [dev[at:at + a.nbytes].view(_torch_dtype(a.dtype)).view(a.shape) for a, at in zip(arrays, offsets)]

    def _buffer(self, nbytes: int) -> torch.Tensor:
        """The next host buffer of the ring, once its last copy is done, grown to ``nbytes``."""
        self._turn = (self._turn + 1) % RING
        done = self._done[self._turn]
        if done is not None:
            done.synchronize()
            self._done[self._turn] = None
        if self._host[self._turn].numel() < nbytes:
            size = max(nbytes, 2 * self._host[self._turn].numel(), 1 << 16)
            self._host[self._turn] = self._allocate(size)
        return self._host[self._turn]

    def _allocate(self, size: int) -> torch.Tensor:
        if self._pin:
            try:
                return torch.empty(size, dtype=torch.uint8, pin_memory=True)
            except RuntimeError as e:  # e.g. the locked-memory limit of a container
                log.warning("pinned host memory unavailable (%s); the step's copies go from pageable memory", e)
                self._pin = False
        return torch.empty(size, dtype=torch.uint8)
