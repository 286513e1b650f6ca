"""RowLayout's per-micro-batch helpers for the capture: a sequence shard's image rows and the
text × image visibility mask, against loops over the positions."""
import torch

from nemo_basic.supervision.layout import RowLayout


def _layout():
    pos = torch.arange(12)
    image = torch.stack([(pos >= 3) & (pos <= 7), torch.zeros(12, dtype=torch.bool), (pos == 1) | (pos >= 9)])
    text = ~image & (pos < 11)
    return RowLayout.from_masks(image, text), image, text


def test_shard_rows_sum_to_the_whole_gather():
    layout, image, _ = _layout()
    x = torch.randn(12, 3, 5, dtype=torch.float64)
    parts = []
    for start in (0, 4, 8):  # three ranks of 4 positions
        part = layout.gather_shard(x[start:start + 4], layout.shard_rows(start, 4))
        for b in range(3):
            for j, p in enumerate(layout.image_index[b].tolist()):
                inside = bool(layout.image_valid[b, j]) and start <= p < start + 4
                assert torch.equal(part[b, j], x[p, b] if inside else torch.zeros(5, dtype=torch.float64))
        parts.append(part)
    assert torch.equal(parts[0] + parts[1] + parts[2], layout.gather(x))


def test_blocked_pairs_are_causal_and_padding():
    layout, image, text = _layout()
    blocked = layout.blocked_pairs
    assert blocked is layout.blocked_pairs  # built once per layout (micro-batch)
    for b in range(3):
        texts = text[b].nonzero().flatten().tolist()
        images = image[b].nonzero().flatten().tolist()
        for t in range(blocked.shape[1]):
            for w in range(blocked.shape[2]):
                visible = t < len(texts) and w < len(images) and images[w] <= texts[t]
                assert bool(blocked[b, t, w]) == (not visible), (b, t, w)
