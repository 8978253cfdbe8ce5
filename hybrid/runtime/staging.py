"""The hand-off between the device and the CPU experts: one copy each way per MoE layer, through reused host
buffers (pinned on CUDA, so the copies are asynchronous DMA).

    st = HostStaging(device)
    h_np, ids_np, w_np = st.to_host(h, ids, w)   # h [T, H], ids [T, k], w [T, k] on the device -> numpy views
    y = st.to_device(out_np)                     # [T, H] float32 numpy -> the device (non-blocking on CUDA)

to_host packs h, ids and the weights into one float32 [T, H + 2k] tensor on the device (ids are exact in
float32 below 2^24; K2 has 384 experts) and copies it to the host buffer in one transfer, where the three
are views. Before, each MoE layer paid three device->host copies into fresh pageable memory and one back.
to_device writes into one of two host buffers (alternating; a buffer is rewritten only after the copy that
last read it has finished, by its event) and starts the copy to the device.
On a CPU device nothing is copied: the views of h, ids and w are used as they are (packed=True forces the
CUDA path's packing and buffers there, for tests).
"""
from __future__ import annotations

import numpy as np
import torch


class HostStaging:
    def __init__(self, device: torch.device, packed: bool | None = None):
        self.device = device
        self.packed = device.type == "cuda" if packed is None else packed
        self._pinned = device.type == "cuda"
        self._up = torch.empty(0)                          # device -> host: [T, H + 2k] float32
        self._down = [torch.empty(0), torch.empty(0)]      # host -> device, double-buffered
        self._down_done: list = [None, None]               # the event after each buffer's last copy
        self._turn = 0

    def to_host(self, h: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> tuple[np.ndarray, ...]:
        """float32 [T, H], int64 [T, k], float32 [T, k] on the host (views valid until the next call)."""
        if not self.packed:
            return (np.ascontiguousarray(h.detach().to(torch.float32).numpy()), ids.detach().numpy(),
                    np.ascontiguousarray(w.detach().to(torch.float32).numpy()))
        T, H = h.shape
        k = ids.shape[1]
        packed = torch.cat([h.detach().float(), ids.detach().float(), w.detach().float()], dim=1)
        self._up = self._host(self._up, T, H + 2 * k)
        dst = self._up[:T]
        dst.copy_(packed, non_blocking=self._pinned)
        if self._pinned:
            torch.cuda.current_stream(self.device).synchronize()   # the CPU kernels read it next
        a = dst.numpy()
        return a[:, :H], a[:, H:H + k].astype(np.int64), a[:, H + k:]

    def to_device(self, out: np.ndarray) -> torch.Tensor:
        """The CPU experts' result [T, H] float32 on the device (queued on the current stream on CUDA)."""
        if not self.packed:
            return torch.from_numpy(out)
        i, self._turn = self._turn, 1 - self._turn
        if self._down_done[i] is not None:
            self._down_done[i].synchronize()               # the last copy out of this buffer has finished
        T, H = out.shape
        self._down[i] = self._host(self._down[i], T, H)
        src = self._down[i][:T]
        src.numpy()[...] = out
        y = src.to(self.device, non_blocking=self._pinned)
        if self._pinned:
            self._down_done[i] = torch.cuda.Event()
            self._down_done[i].record(torch.cuda.current_stream(self.device))
        return y

    def _host(self, old: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """A host buffer of at least [rows, cols] float32 (the old one if it is large enough), pinned on CUDA."""
        if old.dim() == 2 and old.shape[0] >= rows and old.shape[1] == cols:
            return old
        return torch.empty((max(rows, 2 * old.shape[0] if old.dim() == 2 else rows), cols), dtype=torch.float32,
                           pin_memory=self._pinned)
