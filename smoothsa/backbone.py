"""The frozen DINOv2 ViT-S/14 with 4 registers (docs/official.md §2.1), written out with the parameter names of the
official checkpoints (`m.encode_backbone.1.*`, i.e. timm's `vit_small_patch14_reg4_dinov2` names).

Shapes: B batch, P = 16·16 patch tokens, R = 4 registers, D = 384 channels.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from smoothsa.attention import attend


class Interpolate(nn.Module):
    """`F.interpolate(x, scale_factor=…, mode=…)`; the official backbone's first, parameter-free stage."""

    def __init__(self, scale_factor: float = 0.875, mode: str = "bicubic"):
        super().__init__()
        self.scale_factor = scale_factor
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.scale_factor, mode=self.mode)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int = 14, in_chans: int = 3, embed_dim: int = 384):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, P, D)


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)  # (3, B, H, L, E)
        out = attend(qkv[0], qkv[1], qkv[2])  # (B, H, L, E)
        return self.proj(out.transpose(1, 2).flatten(2))  # (B, L, D)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm ViT block with LayerScale: x += ls1(attn(norm1(x))); x += ls2(mlp(norm2(x)))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DINOv2ViT(nn.Module):
    """DINOv2 ViT with register tokens, no final LayerNorm (`norm_out=False`), returning the patch-token map.

    Args:
        img_size: input side (224 after the official 256 → 224 resize).
        patch_size, embed_dim, depth, num_heads, num_registers: ViT-S/14 reg4 by default.

    Shapes: image (B, 3, img_size, img_size) → feature map (B, D, g, g) with g = img_size / patch_size.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 14,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        num_registers: int = 4,
    ):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"DINOv2ViT: img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size = img_size
        self.grid = img_size // patch_size
        self.num_prefix_tokens = 1 + num_registers
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.reg_token = nn.Parameter(torch.zeros(1, num_registers, embed_dim))
        # DINOv2 puts no positional embedding on the class and register tokens.
        self.pos_embed = nn.Parameter(torch.randn(1, self.grid**2, embed_dim) * 0.02)
        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads) for _ in range(depth))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.dim() != 4 or image.shape[1] != 3 or image.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"DINOv2ViT: expected images (B, 3, {self.img_size}, {self.img_size}), got {tuple(image.shape)}"
            )
        x = self.patch_embed(image) + self.pos_embed  # (B, P, D)
        b = x.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1), self.reg_token.expand(b, -1, -1), x], dim=1)
        for block in self.blocks:
            x = block(x)
        x = x[:, self.num_prefix_tokens :]  # (B, P, D)
        return x.transpose(1, 2).unflatten(2, (self.grid, self.grid))  # (B, D, g, g)


def dinov2_backbone() -> nn.Sequential:
    """The official `encode_backbone`: bicubic 256 → 224, then DINOv2 ViT-S/14 reg4; frozen."""
    backbone = nn.Sequential(Interpolate(0.875, "bicubic"), DINOv2ViT())
    backbone.requires_grad_(False)
    return backbone


def sincos_position_code(grid: int, dim: int) -> torch.Tensor:
    """A fixed 2-D sin-cos position code, (grid·grid, dim) in row-major token order.

    Channels are four blocks of dim/4: sin and cos of the row index, then of the column index, at wavelengths
    spaced geometrically from 2 tokens to 4·grid tokens, so nearby tokens get similar codes and every token of
    the grid a distinct one.
    """
    if dim % 4:
        raise ValueError(f"sincos_position_code: dim {dim} is not a multiple of 4")
    quarter = dim // 4
    wavelength = 2.0 * (2.0 * grid) ** (torch.arange(quarter, dtype=torch.float64) / max(quarter - 1, 1))
    index = torch.arange(grid, dtype=torch.float64)
    row, col = torch.meshgrid(index, index, indexing="ij")
    angle_row = row.reshape(-1, 1) * (2 * torch.pi / wavelength)  # (grid·grid, quarter)
    angle_col = col.reshape(-1, 1) * (2 * torch.pi / wavelength)
    return torch.cat([angle_row.sin(), angle_row.cos(), angle_col.sin(), angle_col.cos()], 1).float()


class PatchFeatures(nn.Module):
    """A fixed feature extractor that needs no download: an untrained ViT input layer. Each image patch (side
    image_size / grid) goes through a frozen random Gaussian projection to `feature_dim` channels; with
    `position` > 0 the fixed sin-cos position code (`sincos_position_code`), times `position`, is added, as a
    ViT adds its position embedding.

    It keeps what grouping needs on scenes whose objects differ in colour (two patches of one uniformly
    coloured object get the same projection; mixed patches land in between), is deterministic for a seed,
    and costs one strided convolution. The position code lets a decoder tell where a token lies, as DINOv2's
    features do. It stands in for DINOv2 where its weights cannot be fetched; the code is a non-persistent
    buffer, so the state_dict holds the projection only.

    Shapes: image (B, 3, image_size, image_size) → features (B, feature_dim, grid, grid).
    """

    def __init__(
        self, image_size: int = 128, grid: int = 16, feature_dim: int = 384, seed: int = 0, position: float = 0.0
    ):
        super().__init__()
        if image_size % grid:
            raise ValueError(f"PatchFeatures: image_size {image_size} is not a multiple of grid {grid}")
        patch = image_size // grid
        self.image_size = image_size
        self.proj = nn.Conv2d(3, feature_dim, patch, patch, bias=False)
        generator = torch.Generator().manual_seed(seed)
        weight = torch.randn(feature_dim, 3, patch, patch, generator=generator) / (3 * patch * patch) ** 0.5
        with torch.no_grad():
            self.proj.weight.copy_(weight)
        self.requires_grad_(False)
        code = sincos_position_code(grid, feature_dim).T.reshape(1, feature_dim, grid, grid) if position else None
        self.register_buffer("position_code", None if code is None else code * position, persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.dim() != 4 or image.shape[1] != 3 or image.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"PatchFeatures: expected images (B, 3, {self.image_size}, {self.image_size}), got {tuple(image.shape)}"
            )
        features = self.proj(image)
        if self.position_code is not None:
            features = features + self.position_code.to(features.dtype)
        return features
