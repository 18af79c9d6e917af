"""SelfPatch's positive matching and aggregation module (spec 2.3-2.4).

The teacher picks, for every patch, the k neighbours in a window whose features are most similar, and
summarises them with the same class-attention blocks that build the image-level token. Names follow
the official `SelfPatchHead` (`cls_token`, `cls_blocks.{i}.attn.{q,k,v,proj}`, `norm`) so official
checkpoints map one to one.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from timm.layers.mlp import Mlp
from timm.layers.weight_init import trunc_normal_
from torch import nn

from trainer.models.heads import init_linear

if TYPE_CHECKING:
    from trainer.config import TrainConfig


@lru_cache(maxsize=64)
def neighbor_index(height: int, width: int, window: int = 3, border: str = "wrap") -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbours of every patch of a height x width grid (row-major), the patch itself excluded.

    Returns `index` (N, window**2 - 1) and `valid` (N, window**2 - 1), each row in ascending index order
    as the official `get_local_index` lists them. 'wrap' takes rows and columns modulo the grid (torus,
    official); 'valid' keeps in-grid neighbours only and pads with index 0, valid=False.
    """
    if window % 2 == 0 or window < 3:
        raise ValueError(f"window must be odd and >= 3, got {window}")
    if border not in ("wrap", "valid"):
        raise ValueError(f"border must be 'wrap' or 'valid', got {border!r}")
    if border == "wrap" and min(height, width) < window:
        raise ValueError(f"a {height}x{width} grid is smaller than the {window}x{window} window; use border='valid'")
    half = window // 2
    rows = torch.arange(height).view(height, 1, 1).expand(height, width, 1)
    cols = torch.arange(width).view(1, width, 1).expand(height, width, 1)
    d_row, d_col = torch.meshgrid(torch.arange(-half, half + 1), torch.arange(-half, half + 1), indexing="ij")
    keep = ~((d_row == 0) & (d_col == 0))
    d_row, d_col = d_row[keep].view(1, 1, -1), d_col[keep].view(1, 1, -1)
    n_row, n_col = rows + d_row, cols + d_col
    if border == "wrap":
        index = (n_row % height) * width + n_col % width
        valid = torch.ones_like(index, dtype=torch.bool)
    else:
        valid = (n_row >= 0) & (n_row < height) & (n_col >= 0) & (n_col < width)
        index = torch.where(valid, n_row * width + n_col, torch.full_like(n_row, height * width))
    index, valid = index.reshape(height * width, -1), valid.reshape(height * width, -1)
    # ascending order per row; invalid entries (height*width) sort last, then become index 0
    index, order = index.sort(dim=1)
    valid = valid.gather(1, order)
    index = torch.where(valid, index, torch.zeros_like(index))
    return index, valid


def neighbour_similarity(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Cosine similarity (B, N, M) of every patch of x (B, N, C) with its M neighbours in `index` (N, M).

    While N <= M*C (every realistic grid) it picks the entries out of the (B, N, N) Gram matrix: one
    matrix product, never larger than the (B, N, M, C) gather of neighbour features it replaces, which
    stays the path for larger grids. Both agree to float rounding (about 1e-7).
    """
    x_norm = F.normalize(x, dim=-1)
    batch, n_patches, dim = x.shape
    if n_patches <= index.shape[1] * dim:
        gram = torch.bmm(x_norm, x_norm.transpose(1, 2))
        return gram.gather(2, index.expand(batch, -1, -1))
    return torch.einsum("bnmc,bnc->bnm", x_norm[:, index], x_norm)


def select_positives(
    x: torch.Tensor, index: torch.Tensor, valid: torch.Tensor | None, k: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Indices (B, N, k) of each patch's k neighbours with the highest cosine similarity in x (B, N, C).

    `valid` is None when every neighbour is real ('wrap' border). With a `valid` table, also returns a
    boolean mask (B, N, k) of the picks that are real neighbours (fewer than k exist near corners).
    """
    similarity = neighbour_similarity(x, index)
    if valid is not None:
        similarity = similarity.masked_fill(~valid, float("-inf"))
    top = similarity.topk(k, dim=-1).indices  # (B, N, k) positions in the neighbour table
    chosen = index.expand(x.shape[0], -1, -1).gather(2, top)
    if valid is None:
        return chosen, None
    return chosen, valid.expand(x.shape[0], -1, -1).gather(2, top)


class ClassAttention(nn.Module):
    """Attention with a single query (the first token) over all tokens (CaiT / XCiT class attention)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """query (B, 1, C), keys/values (B, T, C): all projected already, the query token's own key first."""
        batch, tokens, dim = keys.shape
        heads = self.num_heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, -1, heads, dim // heads).transpose(1, 2)

        attn_mask = None if key_mask is None else key_mask.view(batch, 1, 1, tokens)
        out = F.scaled_dot_product_attention(split(query), split(keys), split(values), attn_mask=attn_mask)
        projected: torch.Tensor = self.proj(out.transpose(1, 2).reshape(batch, 1, dim))
        return projected

    def few_keys(
        self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`forward` for a handful of keys per query (a patch's k positives and itself), as elementwise
        products and a softmax over the keys: at T = k + 1 a fused attention kernel spends its time on
        per-(row, head) set-up. The same mathematics (and the official code's), to float rounding."""
        rows, tokens, dim = keys.shape
        heads = self.num_heads
        width = dim // heads
        q = query.reshape(rows, 1, heads, width) * width**-0.5
        scores = (keys.view(rows, tokens, heads, width) * q).sum(dim=-1)  # (R, T, heads)
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask.view(rows, tokens, 1), float("-inf"))
        weights = scores.softmax(dim=1)
        out = (weights.unsqueeze(-1) * values.view(rows, tokens, heads, width)).sum(dim=1)
        projected: torch.Tensor = self.proj(out.reshape(rows, 1, dim))
        return projected


class ClassAttentionBlock(nn.Module):
    """y <- y + CA(LN1([y; X])); y <- y + MLP(LN2(y)). X is read, never updated; no LayerScale.

    LayerNorm acts per token, so the keys and values of X can be projected once per patch and shared by
    every query that attends to it (the image token and all patches that chose it as a positive).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ClassAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def key_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = self.norm1(x)
        return self.attn.k(u), self.attn.v(u)

    def _query(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """q, k, v of the query tokens y (R, 1, C); computed once when y is one query expanded (the first
        block's q0), then the results are that one row (shared=True)."""
        shared = y.shape[0] > 1 and y.stride(0) == 0
        u_y = self.norm1(y[:1] if shared else y)
        return self.attn.q(u_y), self.attn.k(u_y), self.attn.v(u_y), shared

    def _update(
        self,
        y: torch.Tensor,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        key_mask: torch.Tensor | None,
        few: bool = False,
    ) -> torch.Tensor:
        if key_mask is not None:  # the query token always attends to itself
            key_mask = torch.cat([key_mask.new_ones(key_mask.shape[0], 1), key_mask], dim=1)
        y = y + (self.attn.few_keys if few else self.attn)(q, keys, values, key_mask)
        updated: torch.Tensor = y + self.mlp(self.norm2(y))
        return updated

    def attend(
        self, y: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One block update of y (B, 1, C) given the projected keys/values (B, T, C) of the tokens it reads."""
        q, k_y, v_y, shared = self._query(y)
        if shared:
            q, k_y, v_y = (t.expand(y.shape[0], -1, -1) for t in (q, k_y, v_y))
        keys = torch.cat([k_y, keys], dim=1)
        values = torch.cat([v_y, values], dim=1)
        return self._update(y, q, keys, values, key_mask)

    def attend_rows(
        self,
        y: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        rows: torch.Tensor,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`attend` for queries y (R, 1, C) that read the tokens `rows` (R, T) of keys/values (P, C).

        Same values as gathering keys[rows] and prepending each query's own key, but with one gather
        straight into the (R, 1 + T, C) attention input instead of a gather and then a concatenation, and
        the attention over these few keys written out (`ClassAttention.few_keys`).
        """
        q, k_y, v_y, shared = self._query(y)
        n_rows, dim = y.shape[0], y.shape[-1]
        own = torch.zeros(n_rows, 1, dtype=rows.dtype, device=rows.device)
        if not shared:
            own = torch.arange(n_rows, dtype=rows.dtype, device=rows.device).view(-1, 1)
        take = torch.cat([own, rows + k_y.shape[0]], dim=1).view(-1)
        # index_select copies whole rows; advanced indexing (t[take]) is an order of magnitude slower on CPU
        gathered_keys = torch.cat([k_y.reshape(-1, dim), keys]).index_select(0, take).view(n_rows, -1, dim)
        gathered_values = torch.cat([v_y.reshape(-1, dim), values]).index_select(0, take).view(n_rows, -1, dim)
        query = q.expand(n_rows, -1, -1) if shared else q
        return self._update(y, query, gathered_keys, gathered_values, key_mask, few=True)

    def forward(self, x: torch.Tensor, y: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.attend(y, *self.key_values(x), key_mask)


class AggregationHead(nn.Module):
    """SelfPatch's `ca_head`: a learnable query and class-attention blocks shared by two paths.

    Image path (student and teacher): the query attends to all patches, giving the image token.
    Patch path (teacher, `match=True`): for every patch the query attends to its k positives, giving that
    patch's target token. Output: LN([image token; patch tokens]) with one shared final LayerNorm; without
    matching the patch tokens are the backbone's, only normed.
    """

    def __init__(self, dim: int, num_heads: int, *, k: int, window: int, border: str, num_blocks: int = 2) -> None:
        super().__init__()
        self.k, self.window, self.border = k, window, border
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.cls_blocks = nn.ModuleList(ClassAttentionBlock(dim, num_heads) for _ in range(num_blocks))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_linear)
        self._tables: dict[tuple[int, int, torch.device], tuple[torch.Tensor, torch.Tensor | None]] = {}

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> AggregationHead:
        """The module a run's config describes (width and heads of its backbone, cfg.selfpatch): built only here."""
        width, _, heads = cfg.model.dims
        sp = cfg.selfpatch
        return cls(width, heads, k=sp.k, window=sp.window, border=sp.border, num_blocks=sp.num_blocks)

    @property
    def blocks(self) -> list[ClassAttentionBlock]:
        return [cast(ClassAttentionBlock, block) for block in self.cls_blocks]

    def neighbours(self, grid: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The grid's neighbour table on `device` (valid mask None when all entries are real), cached."""
        key = (grid[0], grid[1], device)
        if key not in self._tables:
            index, valid = neighbor_index(grid[0], grid[1], self.window, self.border)
            mask = None if bool(valid.all()) else valid.to(device)
            self._tables[key] = (index.to(device), mask)
        return self._tables[key]

    def forward(self, x: torch.Tensor, grid: tuple[int, int], match: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """x: raw patch tokens (B, N, C). Returns the normed image token (B, C) and patch tokens (B, N, C)."""
        batch, n_patches, dim = x.shape
        image = self.cls_token.expand(batch, -1, -1)
        if not match:
            for block in self.cls_blocks:
                image = block(x, image)
            # LayerNorm acts per token: norming the image token and the patches apart gives the values of
            # norming their concatenation, without copying the patches twice (cat, then a strided slice)
            return self.norm(image[:, 0]), self.norm(x)
        index, valid = self.neighbours(grid, x.device)
        chosen, mask = select_positives(x, index, valid, self.k)  # (B, N, k)
        rows = (chosen + torch.arange(batch, device=x.device).view(-1, 1, 1) * n_patches).view(-1, self.k)
        key_mask = None if mask is None else mask.reshape(batch * n_patches, self.k)
        summary = self.cls_token.expand(batch * n_patches, -1, -1)
        for block in self.blocks:
            keys, values = block.key_values(x)  # shared by both paths
            image = block.attend(image, keys, values)
            summary = block.attend_rows(summary, keys.reshape(-1, dim), values.reshape(-1, dim), rows, key_mask)
        return self.norm(image[:, 0]), self.norm(summary.view(batch, n_patches, dim))
