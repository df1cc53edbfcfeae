"""A small vision transformer of the kind a user brings: convolutional patch embedding, a depthwise convolution as
position encoding, pre-norm blocks of attention (F.scaled_dot_product_attention, or nn.MultiheadAttention) and a
GELU MLP, LayerNorm, mean pooling. Defaults fit the 8x8 grey digits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, kind: str):
        super().__init__()
        self.heads, self.kind = heads, kind
        if kind == "mha":
            self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)
        elif kind == "sdpa":
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        else:
            raise ValueError(f"attention must be sdpa or mha, got {kind!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "mha":
            return self.mha(x, x, x, need_weights=False)[0]
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, kind: str):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, kind)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    def __init__(
        self,
        num_classes: int,
        in_chans: int = 1,
        patch_size: int = 2,
        dim: int = 16,
        depth: int = 2,
        heads: int = 2,
        attention: str = "sdpa",
    ):
        super().__init__()
        self.patch = nn.Conv2d(in_chans, dim, patch_size, patch_size)
        self.position = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)  # depthwise
        self.blocks = nn.Sequential(*[Block(dim, heads, attention) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x)
        x = (x + self.position(x)).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(x)).mean(1))


def tiny_vit(num_classes: int, **kwargs) -> TinyViT:
    """A builder function, the other kind of callable `model.name` may name."""
    return TinyViT(num_classes, **kwargs)
