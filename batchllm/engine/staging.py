"""Static device arrays of a CUDA graph, refilled by one host-to-device copy per replay.

A captured decode step reads its metadata (slots, lengths, block tables, ...) from fixed addresses.
Copying each array on its own costs a pinned staging buffer and a copy launch per array: ~1 ms of
host time per 1,600-row step for eight arrays. Here the arrays are views at aligned offsets of one
device buffer; a step writes them on the host, into a pinned twin of that buffer, and they cross in
one copy. Two twins take turns, each reused only once its previous copy has run, so the host may
write step n+1 while step n's copy still waits in the stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

ALIGN = 16  # bytes; every array starts at a multiple (int64 views, vectorized kernel loads)
NUMPY = {torch.int32: np.int32, torch.int64: np.int64, torch.float32: np.float32}


@dataclass(frozen=True)
class Field:
    """One static array: its shape, dtype and the value it starts with (before any step wrote it)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    fill: int = 0


class Staging:
    """Named device arrays in one buffer, written through host twins (``host``, ``ship``); the twins are
    pinned on CUDA (CUDA graphs run there only; on CPU the same logic runs for tests)."""

    def __init__(self, fields: dict[str, Field], device: torch.device, turns: int = 2) -> None:
        offsets, total = {}, 0
        for name, f in fields.items():
            offsets[name] = total
            total += -(-math.prod(f.shape) * f.dtype.itemsize // ALIGN) * ALIGN
        last = fields[name]
        self.tail_start, self.row_bytes = offsets[name], math.prod(last.shape[1:]) * last.dtype.itemsize
        self.buffer = torch.empty(max(total, ALIGN), dtype=torch.uint8, device=device)
        self.cuda = device.type == "cuda"
        # the twins are allocated pinned and filled on the host, the device arrays filled on the device:
        # nothing waits for the GPU's queue (a new graph key comes up in the middle of a run)
        size = self.buffer.shape[0]
        self.twins = [torch.empty(size, dtype=torch.uint8, pin_memory=self.cuda) for _ in range(turns)]
        self.device: dict[str, torch.Tensor] = {}
        self.hosts: list[dict[str, np.ndarray]] = [{} for _ in self.twins]
        for name, f in fields.items():
            nbytes = math.prod(f.shape) * f.dtype.itemsize
            view = self.buffer[offsets[name] : offsets[name] + nbytes].view(f.dtype).view(f.shape)
            self.device[name] = view.fill_(f.fill)
            for twin, host in zip(self.twins, self.hosts, strict=True):
                array = twin.numpy()[offsets[name] :][:nbytes].view(NUMPY[f.dtype]).reshape(f.shape)
                array.fill(f.fill)
                host[name] = array
        self.copied = [torch.cuda.Event() if self.cuda else None for _ in self.twins]
        self.used = [False] * len(self.twins)
        self.turn = 0

    def host(self) -> dict[str, np.ndarray]:
        """The host arrays to write the next step into (the twin whose turn it is)."""
        event = self.copied[self.turn]
        if event is not None and self.used[self.turn]:
            event.synchronize()  # its copy was queued two steps ago: long done
        return self.hosts[self.turn]

    def ship(self, tail_rows: int | None = None) -> None:
        """Queue the copy of what ``host`` returned into the device arrays, behind the stream's work.
        tail_rows: of the last field, only its first rows (what the step wrote of it; the device keeps
        the rest as they were): a graph's block tables are its largest array by far."""
        end = self.buffer.shape[0] if tail_rows is None else self.tail_start + tail_rows * self.row_bytes
        self.buffer[:end].copy_(self.twins[self.turn][:end], non_blocking=self.cuda)
        event = self.copied[self.turn]
        if event is not None:
            event.record(torch.cuda.current_stream(self.buffer.device))  # the stream the copy went to
            self.used[self.turn] = True
        self.turn = (self.turn + 1) % len(self.twins)
