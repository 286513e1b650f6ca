"""Where a micro-batch's supervised rows sit: padded index tensors, built once per micro-batch.

The losses and the attention mass work on a sample's image rows (m per sample, several images
counted as one set) and text rows. Selecting them with boolean masks (`x[mask]`, `nonzero()`)
asks the host for the number of selected rows every time — a device synchronisation on GPUs,
and they were done per layer and per sample. `RowLayout` asks once: it reads the three counts it
needs (widest image set, widest text set, total image rows) in a single transfer, and from then on
every selection is an index gather with shapes the host already knows.

Layout: `image_index[b, j]` is the sequence position of sample b's j-th image row (ascending),
`image_valid[b, j]` says whether that slot is real (samples with fewer image rows are padded;
padded slots point at a non-image position and are zeroed where they are read). Likewise
`text_index` / `text_valid` for the text rows.
"""
from __future__ import annotations

import dataclasses
import functools

import torch


@dataclasses.dataclass
class RowLayout:
    image_index: torch.Tensor   # [B, W] long
    image_valid: torch.Tensor   # [B, W] bool
    text_index: torch.Tensor    # [B, T] long
    text_valid: torch.Tensor    # [B, T] bool
    image_mask: torch.Tensor    # [B, S] bool
    text_mask: torch.Tensor     # [B, S] bool
    total_image_rows: int       # M = Σ_b image rows

    @classmethod
    def from_masks(cls, image_mask: torch.Tensor, text_mask: torch.Tensor) -> "RowLayout":
        """From bool [B, S] masks; the one host synchronisation of a micro-batch happens here."""
        for name, mask in (("image_mask", image_mask), ("text_mask", text_mask)):
            if mask.dim() != 2 or mask.dtype != torch.bool:
                raise ValueError(f"{name} must be a bool tensor [B, S], got {mask.dtype} {tuple(mask.shape)}")
        if text_mask.shape != image_mask.shape:
            raise ValueError(f"text_mask {tuple(text_mask.shape)} and image_mask {tuple(image_mask.shape)} differ")
        batch, seq = image_mask.shape
        image_counts, text_counts = image_mask.sum(1), text_mask.sum(1)
        if batch:
            width, text_width, total = torch.stack(
                [image_counts.max(), text_counts.max(), image_counts.sum()]).tolist()
        else:
            width = text_width = total = 0

        def padded(mask, counts, w):
            # A stable sort of "not selected" puts the selected positions first, in order.
            index = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :w]
            valid = torch.arange(w, device=mask.device)[None, :] < counts[:, None]
            return index, valid

        image_index, image_valid = padded(image_mask, image_counts, width)
        text_index, text_valid = padded(text_mask, text_counts, text_width)
        return cls(image_index, image_valid, text_index, text_valid, image_mask, text_mask, int(total))

    @property
    def batch(self) -> int:
        return self.image_mask.shape[0]

    @property
    def seq(self) -> int:
        return self.image_mask.shape[1]

    @property
    def width(self) -> int:
        return self.image_index.shape[1]

    @property
    def has_images(self) -> bool:
        return self.total_image_rows > 0

    def _flat(self, index: torch.Tensor) -> torch.Tensor:
        """Row numbers in an [S, B, ...] tensor viewed as [S·B, ...] (Megatron's sequence-first layout)."""
        return (index * self.batch + torch.arange(self.batch, device=index.device)[:, None]).reshape(-1)

    def gather(self, x: torch.Tensor, rows: str = "image") -> torch.Tensor:
        """[S, B, ...] → [B, W, ...]: the image (or text) rows of each sample, zero in padded slots.

        Differentiable in x (backward is an index_add: no synchronisation either)."""
        index, valid = (self.image_index, self.image_valid) if rows == "image" else (self.text_index, self.text_valid)
        if x.shape[:2] != (self.seq, self.batch):
            raise ValueError(f"expected [S, B, ...] = {(self.seq, self.batch)}, got {tuple(x.shape)}")
        out = x.reshape(self.seq * self.batch, *x.shape[2:]).index_select(0, self._flat(index))
        out = out.view(self.batch, index.shape[1], *x.shape[2:])
        return out * valid.view(*valid.shape, *([1] * (x.dim() - 2))).to(out.dtype)

    @functools.cached_property
    def blocked_pairs(self) -> torch.Tensor:
        """[B, T, W] bool: text row t does not see image row w (the image position comes after
        the text position under causal attention, or either slot is padding). It depends on the
        micro-batch only: built at the first use and shared by the k layers' attention mass."""
        return ((self.image_index[:, None, :] > self.text_index[:, :, None])
                | ~self.image_valid[:, None, :] | ~self.text_valid[:, :, None])

    def shard_rows(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat row numbers [B·W], in-shard [B, W]) of the image rows in positions
        [start, start + length) of an [S/n, B, ...] sequence shard (sequence parallelism: rank r
        holds positions r·S/n … (r+1)·S/n − 1). Rows outside the shard point at row 0 and are
        masked. Build once per micro-batch and shard; no synchronisation."""
        local = self.image_index - start
        inside = self.image_valid & (local >= 0) & (local < length)
        flat = (local.clamp(0, max(length - 1, 0)) * self.batch
                + torch.arange(self.batch, device=local.device)[:, None]).reshape(-1)
        return flat, inside

    def gather_shard(self, x: torch.Tensor, shard: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """[S/n, B, ...] shard → [B, W, ...]: the image rows this shard holds, zero elsewhere (so
        the sum of the ranks' results is `gather` of the whole sequence)."""
        flat, inside = shard
        if x.shape[1] != self.batch:
            raise ValueError(f"expected [S/n, B={self.batch}, ...], got {tuple(x.shape)}")
        out = x.reshape(x.shape[0] * self.batch, *x.shape[2:]).index_select(0, flat)
        out = out.view(self.batch, self.width, *x.shape[2:])
        return out * inside.view(*inside.shape, *([1] * (x.dim() - 2))).to(out.dtype)

    def scatter(self, rows: torch.Tensor) -> torch.Tensor:
        """[B, W, ...] image rows → [S, B, ...] with them at their positions, zeros elsewhere
        (inverse of `gather`; padded slots must be zero, as `gather` returns them). Differentiable."""
        flat = rows.reshape(self.batch * self.width, *rows.shape[2:])
        out = rows.new_zeros(self.seq * self.batch, *rows.shape[2:]).index_add(0, self._flat(self.image_index), flat)
        return out.view(self.seq, self.batch, *rows.shape[2:])

    def image_values(self, per_position: torch.Tensor) -> torch.Tensor:
        """[B, S] → [B, W]: a per-position quantity at each sample's image rows (0 in padding)."""
        return per_position.gather(1, self.image_index) * self.image_valid.to(per_position.dtype)
