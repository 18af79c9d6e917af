"""Neighbour tables, positive selection and the aggregation module against hand-written references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.models.selfpatch import AggregationHead, ClassAttentionBlock, neighbor_index, select_positives

# 4x4 grid, row-major:   0  1  2  3 /  4  5  6  7 /  8  9 10 11 / 12 13 14 15
WRAP_4X4 = {
    0: [1, 3, 4, 5, 7, 12, 13, 15],  # corner: takes the last row and column (torus)
    5: [0, 1, 2, 4, 6, 8, 9, 10],  # interior: the plain 3x3 window
    7: [0, 2, 3, 4, 6, 8, 10, 11],  # right edge: wraps to column 0
    9: [4, 5, 6, 8, 10, 12, 13, 14],
    15: [0, 2, 3, 8, 10, 11, 12, 14],  # opposite corner
}
VALID_4X4 = {
    0: [1, 4, 5],
    1: [0, 2, 4, 5, 6],
    5: [0, 1, 2, 4, 6, 8, 9, 10],
    7: [2, 3, 6, 10, 11],
    15: [10, 11, 14],
}


def _valid_rows(index: torch.Tensor, valid: torch.Tensor) -> dict[int, list[int]]:
    return {i: [int(j) for j, ok in zip(index[i], valid[i], strict=True) if ok] for i in range(len(index))}


def test_wrap_neighbours_of_4x4_grid_equal_hand_written_table() -> None:
    index, valid = neighbor_index(4, 4, 3, "wrap")
    assert index.shape == (16, 8) and bool(valid.all())
    for patch, expected in WRAP_4X4.items():
        assert index[patch].tolist() == expected


def test_valid_neighbours_of_4x4_grid_equal_hand_written_table() -> None:
    index, valid = neighbor_index(4, 4, 3, "valid")
    rows = _valid_rows(index, valid)
    for patch, expected in VALID_4X4.items():
        assert rows[patch] == expected
    assert int(valid.sum()) == 4 * 3 + 8 * 5 + 4 * 8  # corners, edges, interior


@pytest.mark.parametrize("border", ["wrap", "valid"])
def test_neighbour_table_matches_a_naive_window_scan(border: str) -> None:
    height, width, window = 5, 7, 5
    index, valid = neighbor_index(height, width, window, border)
    rows = _valid_rows(index, valid)
    half = window // 2
    for r in range(height):
        for c in range(width):
            found = set()
            for dr in range(-half, half + 1):
                for dc in range(-half, half + 1):
                    if dr == dc == 0:
                        continue
                    rr, cc = r + dr, c + dc
                    if border == "wrap":
                        found.add((rr % height) * width + cc % width)
                    elif 0 <= rr < height and 0 <= cc < width:
                        found.add(rr * width + cc)
            assert sorted(found) == sorted(rows[r * width + c])


def test_wrap_refuses_a_grid_smaller_than_the_window() -> None:
    with pytest.raises(ValueError, match="smaller than"):
        neighbor_index(2, 2, 3, "wrap")


def test_top_k_picks_the_most_similar_neighbours() -> None:
    torch.manual_seed(0)
    dim = 16
    x = torch.randn(1, 16, dim) * 0.01
    anchor = torch.zeros(dim)
    anchor[0] = 1.0
    x[0, 5] = anchor
    # neighbours of patch 5 at decreasing similarity to it; a far patch (15) is even more similar
    for rank, patch in enumerate([10, 2, 8, 0]):
        x[0, patch] = anchor + (rank + 1) * 0.2 * torch.eye(dim)[1]
    x[0, 15] = anchor
    index, _ = neighbor_index(4, 4, 3, "wrap")
    chosen, mask = select_positives(x, index, None, k=4)
    assert mask is None
    assert chosen[0, 5].tolist() == [10, 2, 8, 0]  # in order of similarity, and 15 is not a neighbour of 5


def test_valid_border_masks_missing_positives() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 16, 8)
    index, valid = neighbor_index(4, 4, 3, "valid")
    chosen, mask = select_positives(x, index, valid, k=4)
    assert mask is not None
    assert mask[:, 0].sum(dim=-1).tolist() == [3, 3]  # a corner has 3 real neighbours
    assert bool(mask[:, 5].all())
    real = chosen[0, 0][mask[0, 0]].tolist()
    assert sorted(real) == VALID_4X4[0]


def _naive_block(block: ClassAttentionBlock, tokens: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One class-attention update written out for a single query (y: (C,), tokens: (T, C))."""
    u = F.layer_norm(torch.cat([y[None], tokens]), (y.shape[0],), block.norm1.weight, block.norm1.bias, 1e-6)
    heads = block.attn.num_heads
    d = y.shape[0] // heads
    q = block.attn.q(u[0]).view(heads, d)
    k = block.attn.k(u).view(-1, heads, d)
    v = block.attn.v(u).view(-1, heads, d)
    out = []
    for h in range(heads):
        weights = torch.softmax((k[:, h] @ q[h]) / math.sqrt(d), dim=0)
        out.append(weights @ v[:, h])
    y = y + block.attn.proj(torch.cat(out))
    return y + block.mlp(block.norm2(y))


@pytest.mark.parametrize("border", ["wrap", "valid"])
def test_aggregation_equals_a_naive_per_patch_loop(border: str) -> None:
    torch.manual_seed(0)
    dim, heads, k = 24, 3, 4
    head = AggregationHead(dim, heads, k=k, window=3, border=border, num_blocks=2).double()
    x = torch.randn(2, 16, dim, dtype=torch.float64)
    image, patches = head(x, (4, 4), match=True)

    index, valid = neighbor_index(4, 4, 3, border)
    chosen, mask = select_positives(x, index, None if border == "wrap" else valid, k)
    norm = head.norm
    for b in range(2):
        y = head.cls_token[0, 0]
        for block in head.cls_blocks:
            y = _naive_block(block, x[b], y)
        torch.testing.assert_close(image[b], norm(y))
        for i in range(16):
            picks = chosen[b, i] if mask is None else chosen[b, i][mask[b, i]]
            s = head.cls_token[0, 0]
            for block in head.cls_blocks:
                s = _naive_block(block, x[b, picks], s)
            torch.testing.assert_close(patches[b, i], norm(s))


def test_without_matching_patch_tokens_are_only_normed() -> None:
    torch.manual_seed(0)
    head = AggregationHead(16, 2, k=4, window=3, border="wrap")
    x = torch.randn(3, 9, 16)
    _, patches = head(x, (3, 3), match=False)
    torch.testing.assert_close(patches, head.norm(x))
