"""What incremental decoding carries between steps: the images' visual memory and the self-attention cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class VisualMemory:
    """What decoding needs from one batch of images, computed once by `Captioner.encode`."""

    keys: list[Tensor]     # per decoder layer: (B, K, heads, N, head_dim), LN1 and projection applied
    values: list[Tensor]
    mask: Tensor           # (B, N) True on real visual tokens

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    def index_select(self, idx: Tensor) -> VisualMemory:
        return VisualMemory([k.index_select(0, idx) for k in self.keys],
                            [v.index_select(0, idx) for v in self.values], self.mask.index_select(0, idx))


@dataclass
class DecodeState:
    """Incremental-decoding state: the self-attention cache plus the (shared) visual memory.

    Rows are `beams` consecutive copies per memory row: row b reads memory row b // beams.
    The cache is one preallocated tensor for all layers, (layers, 2, B, H_kv, capacity, hd) with
    k at [:, 0] and v at [:, 1]; a step writes its token's k/v in place at position `length`
    (no torch.cat of the whole cache per layer), and a beam reorder is one index_select of all
    layers at once, into a second buffer kept for that (`spare`: the previous step's, so no step
    allocates and page-faults a fresh tens-of-MB buffer). A state is therefore consumed by
    decode_step, reorder, select_images and repeat_rows: keep using the returned state only.
    """

    memory: VisualMemory
    beams: int
    buffer: Tensor | None = None       # (layers, 2, B, H_kv, capacity, hd), filled up to `length`
    key_mask: Tensor | None = None     # (B, capacity) True where the cached token is real
    gates: Tensor | None = None        # (B, 2) of the last step, when asked for
    length: int = 0                    # cached tokens
    padded: bool = False               # some step was given an attention mask: attention reads key_mask
    capacity_hint: int = 0             # tokens to allocate room for at the first step
    xmask: Tensor | None = None        # the memory's additive cross-attention mask, made once per memory
    spare: Tensor | None = None        # a free buffer of the same shape, the target of the next reorder
    coverage: Tensor | None = None     # (layers, B, K, heads, N): attention summed over the steps so far

    @property
    def cache(self) -> list[tuple[Tensor, Tensor]]:
        """Per layer (k, v), each (B, H_kv, length, hd): views of the filled part of the buffer."""
        if self.buffer is None:
            return []
        return [(layer[0, :, :, :self.length], layer[1, :, :, :self.length]) for layer in self.buffer]

    def _rows(self, idx: Tensor, memory: VisualMemory, beams: int) -> DecodeState:
        """A new state whose row b is old row idx[b] (the cache copied, the memory as given)."""
        buf = mask = spare = None
        if self.buffer is not None:
            # only the filled part is copied, into the spare buffer when it has the shape (else a new
            # one); this state's buffer becomes the next one's spare
            shape = self.buffer.shape[:2] + (idx.shape[0],) + self.buffer.shape[3:]
            buf = self.spare if self.spare is not None and self.spare.shape == shape else self.buffer.new_empty(shape)
            torch.index_select(self.buffer[..., :self.length, :], 2, idx, out=buf[..., :self.length, :])
            spare = self.buffer if self.buffer.shape == shape else None
            mask = None if self.key_mask is None else self.key_mask.index_select(0, idx)
        gates = None if self.gates is None else self.gates.index_select(0, idx)
        coverage = None if self.coverage is None else self.coverage.index_select(1, idx)
        xmask = self.xmask if memory is self.memory else None
        return DecodeState(memory, beams, buf, mask, gates, self.length, self.padded, self.capacity_hint, xmask,
                           spare, coverage)

    def reorder(self, beam_idx: Tensor, within_groups: bool | None = None) -> DecodeState:
        """New row b continues old row beam_idx[b] (beam search). Returns a new state.

        Reordering within each image's group of `beams` rows (what beam search does) touches only
        the self-attention cache; a row taken from another image's group makes the memory
        follow (one index_select of the memory, then one memory row per decoder row).
        within_groups=True promises the former (beam search knows it), which skips the check (a
        host-device synchronisation on a GPU).
        """
        beam_idx = beam_idx.to(device=self.memory.mask.device, dtype=torch.long)
        B = self.memory.batch_size * self.beams
        if beam_idx.shape != (B,):
            raise ValueError(f"beam_idx must have shape ({B},), got {tuple(beam_idx.shape)}")
        memory, beams = self.memory, self.beams
        if not within_groups:
            group = torch.arange(B, device=beam_idx.device) // beams
            if not torch.equal(beam_idx // beams, group):
                memory, beams = memory.index_select(beam_idx // self.beams), 1
        return self._rows(beam_idx, memory, beams)

    def select_images(self, images: Tensor, rows: Tensor) -> DecodeState:
        """Keep only some images (done images leave the batch): `images` their indices, `rows` their
        decoder rows in order. The memory follows per image while it is shared, else per row."""
        return self._rows(rows, self.memory.index_select(images if self.beams > 1 else rows), self.beams)

    def repeat_rows(self, n: int) -> DecodeState:
        """Each row becomes n consecutive identical rows (that share its memory row)."""
        idx = torch.arange(self.memory.batch_size * self.beams, device=self.memory.mask.device)
        return self._rows(idx.repeat_interleave(n), self.memory, self.beams * n)


