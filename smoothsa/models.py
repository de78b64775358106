"""SmoothSA (image), SmoothSAVideo and the SPOT baseline (docs/official.md §2.9, §2.10).

Attribute names (`encode_backbone`, `encode_backbone2`, `encode_project`, `initializ`, `aggregat`, `decode`,
`transit`) are the official ones, so `model.state_dict()` has exactly the official checkpoint keys without
their `m.` prefix.

Shapes: B batch, T frames, N = h·w tokens (16·16), S slots, Dv feature channels (384), Ds slot channels (256).
"""
import copy
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class SlotOutput:
    """What every discovery model returns. Leading axes are (B,) for images and (B, T) for videos.

    feature: (B, [T,] Dv, h, w) backbone features, the reconstruction target (no gradient); for a SPOT that
        fine-tunes its backbone, the features of its frozen copy.
    qinit: (B, S, Ds) the initializer's prediction of the (first-frame) slots; for SPOT, the sampled query.
    slots: (B, [T,] S, Ds) slots after slot attention.
    attn_enc: (B, [T,] S, h, w) slot attention of the last iteration (softmax over slots).
    recon: (B, [T,] Dv, h, w) decoder reconstruction of `feature`.
    attn_dec: (B, [T,] S, h, w) last decoder layer's cross-attention, averaged over heads.
    """

    feature: torch.Tensor
    qinit: torch.Tensor
    slots: torch.Tensor
    attn_enc: torch.Tensor
    recon: torch.Tensor
    attn_dec: torch.Tensor


def zero_biases(*modules: nn.Module) -> None:
    """The official `reset_parameters`: zero every Linear / Conv2d bias and both GRUCell biases."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GRUCell):
                nn.init.zeros_(m.bias_ih)
                nn.init.zeros_(m.bias_hh)


class _SlotModel(nn.Module):
    """What all models share: the frozen backbone, the token projection, initializer, slot attention, decoder.

    Args:
        encode_backbone: the frozen backbone, or None: the model then takes the (B, [T,] Dv, h, w) feature map.
        encode_project: the token MLP, Dv → Dv.
        initializ: the slot initializer.
        aggregat: `SlotAttention`.
        decode: the decoder.
        transit: video models only, `RSFQTransit`.
        encode_backbone2: SPOT fine-tuning its backbone only: a frozen copy of the backbone whose features are
            the reconstruction target and the decoder's input.
        resolution: the feature grid (h, w).
        feature_dim: Dv.
        image_size: the side of the images the backbone expects.
    """

    # Modules whose Linear / GRU biases the official `reset_parameters` zeroes.
    zeroed_biases: tuple[str, ...] = ("encode_posit_embed", "encode_project", "aggregat")

    def __init__(
        self, encode_backbone: nn.Module | None, encode_project: nn.Module, initializ: nn.Module, aggregat: nn.Module,
        decode: nn.Module, transit: nn.Module | None = None, resolution: tuple[int, int] = (16, 16),
        feature_dim: int = 384, image_size: int = 256, encode_backbone2: nn.Module | None = None,
    ):
        super().__init__()
        self.has_backbone = encode_backbone is not None
        self.resolution = tuple(resolution)
        self.feature_dim = feature_dim
        self.image_size = image_size
        # Registration order = the official state_dict order.
        self.encode_backbone = encode_backbone if self.has_backbone else nn.Identity()
        if encode_backbone2 is not None:
            self.encode_backbone2 = encode_backbone2.requires_grad_(False)
        self.encode_posit_embed = nn.Identity()
        self.encode_project = encode_project
        self.initializ = initializ
        self.aggregat = aggregat
        self.decode = decode
        if transit is not None:
            self.transit = transit
        zero_biases(*(getattr(self, name) for name in self.zeroed_biases))

    def _expected_input(self) -> tuple[int, int, int]:
        if self.has_backbone:
            return (3, self.image_size, self.image_size)
        return (self.feature_dim, *self.resolution)

    def _check_input(self, input: torch.Tensor, video: bool) -> None:
        expected = self._expected_input()
        lead = "B, T" if video else "B"
        what = "images" if self.has_backbone else "backbone feature maps (built with backbone=False)"
        if input.dim() != len(expected) + (2 if video else 1) or tuple(input.shape[-3:]) != expected:
            raise ValueError(
                f"{type(self).__name__}: input must be {what} of shape ({lead}, {', '.join(map(str, expected))}), "
                f"got {tuple(input.shape)}"
            )

    def _features(self, input: torch.Tensor) -> torch.Tensor:
        """(B', 3, H, W) or (B', Dv, h, w) → frozen feature map (B', Dv, h, w)."""
        return self.encode_backbone(input).detach()

    def _encode(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(…, Dv, h, w) → tokens (…, N, Dv) and projected tokens (…, N, Dv)."""
        tokens = feature.flatten(-2).transpose(-1, -2)  # (…, N, Dv), row-major over (h, w)
        return tokens, self.encode_project(self.encode_posit_embed(tokens))

    def _grid(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, self.resolution)  # (…, N) → (…, h, w)

    def _grid_channels(self, x: torch.Tensor) -> torch.Tensor:
        return self._grid(x.transpose(-1, -2))  # (…, N, D) → (…, D, h, w)


class SmoothSA(_SlotModel):
    """Image SmoothSA: preheated slot initialization, bi-level slot attention, random-mask transformer decoder.

    Args: see `_SlotModel`; `initializ` is a `NormalSharedPreheated`, `decode` an `ARRandTransformerDecoder`.

    Shapes: input (B, 3, 256, 256) images or (B, 384, 16, 16) features → `SlotOutput`.
    `init_noise` (B, S, Ds) replaces the initializer's N(0, 1) draw, making evaluation reproducible.
    """

    def forward(self, input: torch.Tensor, condit: torch.Tensor | None = None, init_noise: torch.Tensor | None = None):
        self._check_input(input, video=False)
        feature = self._features(input)  # (B, Dv, h, w)
        tokens, encode = self._encode(feature)  # (B, N, Dv) each
        qinit, query = self.initializ(encode, condit, init_noise)  # (B, S, Ds)
        slots, attn_enc = self.aggregat(encode, query)  # (B, S, Ds), (B, S, N)
        recon, attn_dec = self.decode(tokens, slots)  # the decoder reads the raw tokens, not `encode`
        return SlotOutput(
            feature, qinit, slots, self._grid(attn_enc), self._grid_channels(recon), self._grid(attn_dec)
        )


class SmoothSAVideo(_SlotModel):
    """Video SmoothSA: frame 0 as the image model; each later frame's query comes from `RSFQTransit` on the
    previous slots, followed by a single slot-attention iteration. All frames are decoded as one batch.

    Args: as `SmoothSA`, plus `transit` (`RSFQTransit`).

    Shapes: input (B, T, 3, 256, 256) or (B, T, 384, 16, 16); condit (B, T, S, 4) boxes (only frame 0 is used)
    for `NormalMlpPreheated`, None for `NormalSharedPreheated` → `SlotOutput` with a T axis (qinit: frame 0).
    """

    zeroed_biases = ("encode_posit_embed", "encode_project", "aggregat", "transit")

    def forward(self, input: torch.Tensor, condit: torch.Tensor | None = None, init_noise: torch.Tensor | None = None):
        self._check_input(input, video=True)
        b, t = input.shape[:2]
        if condit is not None and (condit.dim() != 4 or tuple(condit.shape[:2]) != (b, t)):
            raise ValueError(
                f"SmoothSAVideo: condit must be (B={b}, T={t}, S, 4) per-frame boxes, got {tuple(condit.shape)}"
            )
        feature = self._features(input.flatten(0, 1)).unflatten(0, (b, t))  # (B, T, Dv, h, w)
        tokens, encode = self._encode(feature)  # (B, T, N, Dv) each
        qinit, query = self.initializ(encode[:, 0], None if condit is None else condit[:, 0], init_noise)
        slots, attns = [], []
        for i in range(t):
            if i > 0:
                query = self.transit(torch.stack(slots, 1), encode[:, : i + 1])  # (B, S, Ds)
            slots_i, attn_i = self.aggregat(encode[:, i], query, num_iter=None if i == 0 else 1)
            slots.append(slots_i)
            attns.append(attn_i)
        slots = torch.stack(slots, 1)  # (B, T, S, Ds)
        attn_enc = torch.stack(attns, 1)  # (B, T, S, N)
        recon, attn_dec = self.decode(tokens.flatten(0, 1), slots.flatten(0, 1))  # (B·T, N, Dv), (B·T, S, N)
        recon = recon.unflatten(0, (b, t))
        attn_dec = attn_dec.unflatten(0, (b, t))
        return SlotOutput(
            feature, qinit, slots, self._grid(attn_enc), self._grid_channels(recon), self._grid(attn_dec)
        )


class SPOT(_SlotModel):
    """The SPOT baseline: a learnt Gaussian initializer, untruncated slot attention, SPOT's 9-order
    autoregressive decoder.

    Args: as `SmoothSA`, with `initializ` a `NormalShared` and `decode` an `AR9TransformerDecoder`, plus
        finetune: the distillation student's setting (docs/official.md §2.9b). The backbone's output keeps its
            graph, so whichever backbone parameters are left trainable learn through slot attention; a frozen
            copy of the backbone as passed in, `encode_backbone2`, computes the reconstruction target and the
            decoder's input tokens. Off, the backbone's output is detached and is both.

    Shapes: input (B, 3, 256, 256) or (B, 384, 16, 16) → `SlotOutput` whose `qinit` is the sampled query.
    """

    zeroed_biases = ("encode_posit_embed", "encode_project", "aggregat", "decode")

    def __init__(
        self, encode_backbone: nn.Module | None, encode_project: nn.Module, initializ: nn.Module, aggregat: nn.Module,
        decode: nn.Module, resolution: tuple[int, int] = (16, 16), feature_dim: int = 384, image_size: int = 256,
        finetune: bool = False,
    ):
        # The copy is taken from the backbone as passed in, before anything is trained or loaded.
        backbone2 = None
        if finetune:
            backbone2 = copy.deepcopy(encode_backbone if encode_backbone is not None else nn.Identity())
        super().__init__(
            encode_backbone, encode_project, initializ, aggregat, decode, resolution=resolution,
            feature_dim=feature_dim, image_size=image_size, encode_backbone2=backbone2,
        )
        self.finetune = finetune

    def _features_and_target(self, input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) → the features slot attention reads and the target features, (B, Dv, h, w) each."""
        if not self.finetune:
            feature = self._features(input)
            return feature, feature
        feature = self.encode_backbone(input)  # keeps its graph: the trainable backbone blocks learn
        with torch.inference_mode():
            target = self.encode_backbone2(input)
        return feature, target.clone()  # clone: an ordinary tensor outside inference mode

    def forward(self, input: torch.Tensor, condit: torch.Tensor | None = None, init_noise: torch.Tensor | None = None):
        self._check_input(input, video=False)
        if condit is not None:
            raise ValueError("SPOT takes no condit")
        feature, target = self._features_and_target(input)
        _, encode = self._encode(feature)
        query = self.initializ(input.shape[0], init_noise)  # (B, S, Ds)
        slots, attn_enc = self.aggregat(encode, query)
        tokens = target.flatten(-2).transpose(-1, -2)  # (B, N, Dv)
        recon, attn_dec = self.decode(tokens, slots)
        return SlotOutput(
            target, query, slots, self._grid(attn_enc), self._grid_channels(recon), self._grid(attn_dec)
        )
