"""A ViT-style patch transformer, built only from layers Opacus has per-sample rules for.

Attention is written with nn.Linear projections instead of nn.MultiheadAttention (which
ModuleValidator would swap for DPMultiheadAttention, changing state_dict keys), and the
class token and positions are nn.Embedding lookups instead of bare nn.Parameters (which
the default 'hooks' grad sampler cannot handle).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length, dim = tokens.shape
        qkv = self.qkv(tokens).reshape(batch, length, 3, self.heads, dim // self.heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)
        weights = torch.softmax(query @ key.transpose(-2, -1) / math.sqrt(dim // self.heads), dim=-1)
        mixed = (weights @ value).transpose(1, 2).reshape(batch, length, dim)
        return self.out(mixed)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: attention then MLP, each with a residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens + self.attention(self.norm1(tokens))
        return tokens + self.mlp(self.norm2(tokens))


class TransformerEncoder(nn.Module):
    """Adds learned positions to a token sequence and runs it through the blocks.

    Shared by images (patch tokens) and token sequences (embedded ids).
    """

    def __init__(self, dim: int, depth: int, heads: int, max_length: int) -> None:
        super().__init__()
        self.positions = nn.Embedding(max_length, dim)
        self.blocks = nn.Sequential(*(EncoderBlock(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length, _ = tokens.shape
        # Expanded to (batch, length) so Opacus sees one lookup per example.
        positions = torch.arange(length, device=tokens.device).expand(batch, length)
        return self.norm(self.blocks(tokens + self.positions(positions)))


class PatchTransformer(nn.Module):
    """Images cut into patches, a class token in front, classified from that token."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        patch_size: int | None = None,
    ) -> None:
        super().__init__()
        channels, height, width = input_shape
        self.patch_size = patch_size or (2 if max(height, width) <= 16 else 4)
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"images of {height}x{width} do not split into {self.patch_size}px patches")
        num_patches = (height // self.patch_size) * (width // self.patch_size)
        self.patch_embedding = nn.Linear(channels * self.patch_size**2, dim)
        self.class_token = nn.Embedding(1, dim)
        self.encoder = TransformerEncoder(dim, depth, heads, max_length=num_patches + 1)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch = images.shape[0]
        patches = (
            nn.functional.unfold(images, kernel_size=self.patch_size, stride=self.patch_size)
            .transpose(1, 2)
            .contiguous()
        )
        tokens = self.patch_embedding(patches)
        class_token = self.class_token(torch.zeros(batch, 1, dtype=torch.long, device=images.device))
        encoded = self.encoder(torch.cat([class_token, tokens], dim=1))
        return self.head(encoded[:, 0])


class TokenTransformer(nn.Module):
    """The same encoder over token ids: embedding, encoder, mean-pooled classification."""

    def __init__(
        self, vocab_size: int, max_length: int, num_classes: int, dim: int = 64, depth: int = 2, heads: int = 4
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim)
        self.encoder = TransformerEncoder(dim, depth, heads, max_length=max_length)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embedding(token_ids)).mean(dim=1))
