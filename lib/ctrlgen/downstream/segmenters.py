"""The segmentation zoo (thesis §4.4.4 Tables 4.5–4.7, §5.4.2 Table 5.3): five lesion segmenters, logits out.

* ``unet`` — MONAI ``BasicUNet`` (Ronneberger et al. 2015): two convolutions per level, max-pool down, transposed
  convolution up, skip concatenation.
* ``attention_unet`` — MONAI ``AttentionUnet`` (Oktay et al. 2018): additive attention gates on the skips.
* ``dcsau_net`` — :class:`DCSAUNet` (Xu et al. 2023), ``xboundformer`` — :class:`XBoundFormer` (Wang et al. 2023),
  ``fat_net`` — :class:`FATNet` (Wu et al. 2022): compact re-implementations from the papers (no maintained
  package provides them); each class docstring names the blocks kept and what is scaled down.

``size="full"`` uses the papers' widths and depths, ``size="mini"`` narrower/shallower versions of the same
blocks for the CPU profile. Every model comes behind :class:`ImageInput` (input ``(B, 3, H, W)`` in [0, 1],
ImageNet-normalised, padded to a multiple of 32 and cropped back) and returns logits ``(B, out_channels, H, W)``.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.networks.nets import AttentionUnet, BasicUNet
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from ctrlgen.downstream.inputs import ImageInput, load_state_dict_file

SEGMENTERS = ("unet", "attention_unet", "dcsau_net", "xboundformer", "fat_net")
SIZES = ("mini", "full")
PAD_MULTIPLE = 32  # the deepest total stride in the zoo (XBound-Former full: 4 · 2 · 2 · 2)


def conv_bn_relu(cin: int, cout: int, k: int = 3, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _up_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)


# ================================================================================================ DCSAU-Net
class PFC(nn.Module):
    """Primary feature conservation (DCSAU-Net §3.1): a 3 × 3 convolution, then a large-kernel (7 × 7) depthwise
    convolution and a pointwise convolution, each with a residual connection — a wide receptive field at the
    first level for few parameters."""

    def __init__(self, cin: int, cout: int, kernel: int = 7):
        super().__init__()
        self.input = conv_bn_relu(cin, cout)
        self.depthwise = conv_bn_relu(cout, cout, kernel, groups=cout)
        self.pointwise = conv_bn_relu(cout, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input(x)
        x = x + self.depthwise(x)
        return x + self.pointwise(x)


class CSA(nn.Module):
    """Compact split-attention block (DCSAU-Net §3.2): after a 1 × 1 convolution the features take two paths of
    different depth (one 3 × 3 convolution; two stacked, the second fed by the first, so the paths see different
    receptive fields); split attention (ResNeSt-style: global pooling of their sum, a bottleneck MLP, a softmax
    across the two paths) weighs them; a 1 × 1 convolution and a residual connection close the block."""

    def __init__(self, cin: int, cout: int, reduction: int = 4):
        super().__init__()
        self.reduce = conv_bn_relu(cin, cout, 1)
        self.path1 = conv_bn_relu(cout, cout)
        self.path2 = conv_bn_relu(cout, cout)
        hidden = max(cout // reduction, 8)
        self.attention = nn.Sequential(nn.Conv2d(cout, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
                                       nn.Conv2d(hidden, 2 * cout, 1))
        self.out = nn.Sequential(nn.Conv2d(cout, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = nn.Identity() if cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False),
                                                                        nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.reduce(x)
        p1 = self.path1(y)
        p2 = self.path2(p1)
        logits = self.attention(F.adaptive_avg_pool2d(p1 + p2, 1))
        a = logits.view(len(x), 2, -1, 1, 1).softmax(dim=1)  # r-softmax over the two paths
        y = self.out(a[:, 0] * p1 + a[:, 1] * p2)
        return F.relu(y + self.shortcut(x))


class DCSAUNet(nn.Module):
    """DCSAU-Net (Xu, Ma, Na and Duan, "DCSAU-Net: A deeper and more compact split-attention U-Net for medical
    image segmentation", Computers in Biology and Medicine 154, 2023; thesis §4.4.4, §5.4.2).

    Kept: the PFC block at the first level, CSA blocks at every deeper encoder level and in every decoder level
    (bilinear ×2 up-sampling, concatenation with the skip), max-pool down-sampling, a 1 × 1 output convolution.
    Scaled: ``widths`` — full (64, 128, 256, 512, 1024) as in the paper's code; mini (16, 32, 64, 128), one level
    fewer.
    """

    def __init__(self, in_channels: int, out_channels: int, widths: Sequence[int]):
        super().__init__()
        self.stem = PFC(in_channels, widths[0])
        self.down = nn.ModuleList(CSA(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.up = nn.ModuleList(CSA(b + a, a) for a, b in zip(widths[:-1], widths[1:]))
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(x)]
        for block in self.down:
            skips.append(block(F.max_pool2d(skips[-1], 2)))
        y = skips.pop()
        for block, skip in zip(reversed(self.up), reversed(skips)):
            y = block(torch.cat([_up_to(y, skip), skip], dim=1))
        return self.head(y)


# ================================================================================================ XBound-Former
class SRAttention(nn.Module):
    """Spatial-reduction attention of the pyramid vision transformer (PVT, Wang et al. 2021), XBound-Former's
    backbone: keys and values from a ``sr``-times down-sampled map, so attention stays cheap at fine scales."""

    def __init__(self, dim: int, heads: int, sr: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.sr = nn.Conv2d(dim, dim, sr, stride=sr) if sr > 1 else nn.Identity()
        self.norm_kv = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        b, n, c = tokens.shape
        grid = tokens.transpose(1, 2).reshape(b, c, *hw)
        kv = self.norm_kv(self.sr(grid).flatten(2).transpose(1, 2))
        return self.attn(tokens, kv, kv, need_weights=False)[0]


class PVTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, sr: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SRAttention(dim, heads, sr)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, tokens: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        tokens = tokens + self.attn(self.norm1(tokens), hw)
        return tokens + self.mlp(self.norm2(tokens))


class BoundaryLearner(nn.Module):
    """XBound-Former's boundary learners at one scale.

    Explicit: a boundary map predicted from the features (supervised with the mask's boundary, see
    :meth:`XBoundFormer.auxiliary_loss`). Implicit: learnable boundary queries gather boundary-weighted features
    by cross-attention; the features then attend to these queries plus the coarser scale's (the cross-scale
    boundary learner), so boundary knowledge found at one scale refines the next finer one.
    """

    def __init__(self, dim: int, heads: int, queries: int, coarser_dim: int | None):
        super().__init__()
        self.edge = nn.Conv2d(dim, 1, 3, padding=1)
        self.queries = nn.Parameter(torch.randn(1, queries, dim) * 0.02)
        self.gather = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.bring = nn.Linear(coarser_dim, dim) if coarser_dim else None
        self.scatter = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, feat: torch.Tensor, coarser: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, c, h, w = feat.shape
        edge = self.edge(feat)
        tokens = feat.flatten(2).transpose(1, 2)
        weighted = tokens * torch.sigmoid(edge).flatten(2).transpose(1, 2)  # boundary pixels lead
        q = self.gather(self.queries.expand(b, -1, -1), weighted, weighted, need_weights=False)[0]
        memory = q if coarser is None or self.bring is None else torch.cat([q, self.bring(coarser)], dim=1)
        tokens = tokens + self.scatter(self.norm(tokens), memory, memory, need_weights=False)[0]
        return tokens.transpose(1, 2).reshape(b, c, h, w), edge, q


class XBoundFormer(nn.Module):
    """XBound-Former (Wang, Wei, Zhang et al., "XBound-Former: Toward cross-scale boundary modeling in
    transformers", IEEE Transactions on Medical Imaging 42(6), 2023; thesis §4.4.4).

    Kept: a pyramid-vision-transformer encoder (overlapping patch embeddings, spatial-reduction attention),
    the implicit boundary learner (learnable boundary queries), the explicit boundary learner (boundary maps
    supervised with the mask boundary, an auxiliary loss) and the cross-scale boundary learner (each scale's
    features attend to its own and the coarser scale's boundary queries, coarse to fine), then a top-down
    fusion decoder. Scaled: full follows PVTv2-b2 (widths 64/128/320/512, depths 3/4/6/3); mini uses three
    stages (32/64/128, one block each) and fewer queries.
    """

    def __init__(self, in_channels: int, out_channels: int, dims: Sequence[int], depths: Sequence[int],
                 heads: Sequence[int], srs: Sequence[int], queries: int):
        super().__init__()
        self.embeds = nn.ModuleList()
        self.stages = nn.ModuleList()
        self.norms = nn.ModuleList()
        for i, dim in enumerate(dims):
            cin, k, s = (in_channels, 7, 4) if i == 0 else (dims[i - 1], 3, 2)
            self.embeds.append(nn.Sequential(nn.Conv2d(cin, dim, k, stride=s, padding=k // 2), nn.BatchNorm2d(dim)))
            self.stages.append(nn.ModuleList(PVTBlock(dim, heads[i], srs[i]) for _ in range(depths[i])))
            self.norms.append(nn.LayerNorm(dim))
        self.boundary = nn.ModuleList(
            BoundaryLearner(dim, heads[i], queries, dims[i + 1] if i + 1 < len(dims) else None)
            for i, dim in enumerate(dims))
        fused = dims[0]
        self.lateral = nn.ModuleList(nn.Conv2d(dim, fused, 1) for dim in dims)
        self.head = nn.Sequential(conv_bn_relu(fused, fused), nn.Conv2d(fused, out_channels, 1))
        self._edges: list[torch.Tensor] = []

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for embed, blocks, norm in zip(self.embeds, self.stages, self.norms):
            x = embed(x)
            b, c, h, w = x.shape
            tokens = x.flatten(2).transpose(1, 2)
            for block in blocks:
                tokens = block(tokens, (h, w))
            x = norm(tokens).transpose(1, 2).reshape(b, c, h, w)
            feats.append(x)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encode(x)
        coarser, refined, edges = None, [], []
        for feat, learner in zip(reversed(feats), reversed(self.boundary)):  # coarse to fine
            feat, edge, coarser = learner(feat, coarser)
            refined.append(feat)
            edges.append(edge)
        y = None
        for feat, lateral in zip(refined, reversed(self.lateral)):
            y = lateral(feat) if y is None else lateral(feat) + _up_to(y, feat)
        self._edges = edges
        return F.interpolate(self.head(y), size=x.shape[-2:], mode="bilinear", align_corners=False)

    def auxiliary_loss(self, masks: torch.Tensor) -> torch.Tensor:
        """Boundary supervision of the explicit boundary learner: BCE of each scale's boundary map against the
        mask's boundary (morphological gradient: 3 × 3 dilation minus erosion) resized to that scale."""
        target = masks.float()
        boundary = F.max_pool2d(target, 3, 1, 1) + F.max_pool2d(-target, 3, 1, 1)  # dilate - erode
        losses = [F.binary_cross_entropy_with_logits(e, F.adaptive_max_pool2d(boundary, e.shape[-2:]))
                  for e in self._edges]
        return torch.stack(losses).mean()


# ================================================================================================ FAT-Net
class FAM(nn.Module):
    """Feature adaptation module (FAT-Net §3.3) in a skip connection: channel attention computed from the deeper
    decoder features selects the encoder's useful channels, spatial attention from the encoder features
    suppresses background, and the adapted skip is added to the (projected) decoder features."""

    def __init__(self, skip: int, deep: int, reduction: int = 4):
        super().__init__()
        hidden = max(deep // reduction, 8)
        self.channel = nn.Sequential(nn.Linear(deep, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, skip))
        self.spatial = nn.Conv2d(2, 1, 7, padding=3)
        self.project = conv_bn_relu(deep, skip, 1)

    def forward(self, skip: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
        deep = _up_to(deep, skip)
        ca = torch.sigmoid(self.channel(deep.mean(dim=(2, 3))))[:, :, None, None]
        sa = torch.sigmoid(self.spatial(torch.cat([skip.mean(1, keepdim=True), skip.amax(1, keepdim=True)], 1)))
        return skip * ca * sa + self.project(deep)


class EfficientDecoderBlock(nn.Module):
    """FAT-Net's memory-efficient decoder block: 1 × 1 reduction, 3 × 3 depthwise, 1 × 1 expansion (no wide
    concatenation), after the FAM has merged the skip by addition."""

    def __init__(self, channels: int):
        super().__init__()
        mid = max(channels // 4, 8)
        self.body = nn.Sequential(conv_bn_relu(channels, mid, 1), conv_bn_relu(mid, mid, 3, groups=mid),
                                  conv_bn_relu(mid, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class FATNet(nn.Module):
    """FAT-Net (Wu, Chen, Chen, Wang, Lei and Wen, "FAT-Net: Feature adaptive transformers for automated skin
    lesion segmentation", Medical Image Analysis 76, 2022; thesis §5.4.2).

    Kept: the dual encoder — a ResNet CNN branch (ResNet-34 in the paper, ImageNet-pretrained: pass
    ``encoder_weights``) and a parallel transformer branch (DeiT-style ViT on 16 × 16 patches) for long-range
    context — fused at the 1/16 bottleneck; FAMs in the skip connections; memory-efficient decoder blocks.
    Scaled: the CNN branch stops after ResNet's third stage (1/16, where the transformer tokens live); full uses
    ResNet-34's stages and a DeiT-small transformer (384 wide, 12 layers, 6 heads); mini uses ResNet-10-style
    stages (one block each) and a 4-layer, 192-wide transformer. The transformer starts from scratch (the
    profile names no DeiT weights).
    """

    def __init__(self, in_channels: int, out_channels: int, blocks: Sequence[int], dim: int, depth: int, heads: int,
                 encoder_weights: str | Path | None = None):
        super().__init__()
        resnet = ResNet(BasicBlock, list(blocks))  # the whole ResNet, so an ImageNet file loads strictly
        if encoder_weights is not None:
            load_state_dict_file(resnet, encoder_weights, "torchvision's ImageNet state dict of resnet34")
        if in_channels != 3:
            resnet.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu)  # 1/2, 64
        self.pool = resnet.maxpool
        # 1/4 64, 1/8 128, 1/16 256 channels; layer4 and the fc head are dropped
        self.layers = nn.ModuleList([resnet.layer1, resnet.layer2, resnet.layer3])
        self.patch = nn.Conv2d(in_channels, dim, 16, stride=16)
        self.pos = nn.Parameter(torch.zeros(1, dim, 14, 14))  # DeiT's 224/16 grid, resized to the input
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.fuse = conv_bn_relu(256 + dim, 256, 1)
        self.fams = nn.ModuleList([FAM(128, 256), FAM(64, 128), FAM(64, 64)])
        self.decoders = nn.ModuleList([EfficientDecoderBlock(c) for c in (128, 64, 64)])
        self.head = nn.Conv2d(64, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s2 = self.stem(x)
        s4 = self.layers[0](self.pool(s2))
        s8 = self.layers[1](s4)
        s16 = self.layers[2](s8)
        t = self.patch(x)
        t = t + F.interpolate(self.pos, size=t.shape[-2:], mode="bilinear", align_corners=False)
        b, c, h, w = t.shape
        t = self.transformer(t.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, c, h, w)
        y = self.fuse(torch.cat([s16, _up_to(t, s16)], dim=1))
        for fam, block, skip in zip(self.fams, self.decoders, (s8, s4, s2)):
            y = block(fam(skip, y))
        return F.interpolate(self.head(y), size=x.shape[-2:], mode="bilinear", align_corners=False)


# ================================================================================================ the zoo
def _net(name: str, cin: int, cout: int, size: str, encoder_weights: str | Path | None) -> nn.Module:
    full = size == "full"
    if name == "unet":
        features = (32, 32, 64, 128, 256, 32) if full else (16, 16, 32, 64, 128, 16)  # MONAI's default is full
        return BasicUNet(spatial_dims=2, in_channels=cin, out_channels=cout, features=features)
    if name == "attention_unet":
        channels = (64, 128, 256, 512, 1024) if full else (16, 32, 64, 128)  # Oktay et al.'s widths in full
        return AttentionUnet(spatial_dims=2, in_channels=cin, out_channels=cout, channels=channels,
                             strides=(2,) * (len(channels) - 1))
    if name == "dcsau_net":
        return DCSAUNet(cin, cout, (64, 128, 256, 512, 1024) if full else (16, 32, 64, 128))
    if name == "xboundformer":
        if full:
            return XBoundFormer(cin, cout, (64, 128, 320, 512), (3, 4, 6, 3), (1, 2, 5, 8), (8, 4, 2, 1), queries=16)
        return XBoundFormer(cin, cout, (32, 64, 128), (1, 1, 1), (1, 2, 4), (4, 2, 1), queries=8)
    if full:
        return FATNet(cin, cout, (3, 4, 6, 3), dim=384, depth=12, heads=6, encoder_weights=encoder_weights)
    return FATNet(cin, cout, (1, 1, 1, 1), dim=192, depth=4, heads=3, encoder_weights=encoder_weights)


def build_segmenter(name: str, in_channels: int = 3, out_channels: int = 1, size: str = "mini",
                    encoder_weights: str | Path | None = None) -> nn.Module:
    """A segmenter of the zoo behind :class:`ImageInput`: images ``(B, 3, H, W)`` in [0, 1] -> logits
    ``(B, out_channels, H, W)`` at the input size (any H, W: padded to a multiple of 32 inside, cropped back).

    ``size``: "full" (the papers' widths) or "mini" (narrower, see each class). ``encoder_weights``: FAT-Net's
    ImageNet ResNet state dict (``models.weights.imagenet.resnet34`` in full; only with ``size="full"``, whose
    CNN branch is ResNet-34); the other models train from scratch as in the thesis.
    """
    if name not in SEGMENTERS:
        raise ValueError(f"unknown segmenter {name!r}; known: {', '.join(SEGMENTERS)}")
    if size not in SIZES:
        raise ValueError(f"unknown segmenter size {size!r}; expected one of {', '.join(SIZES)}")
    if encoder_weights is not None and (name != "fat_net" or size != "full"):
        raise ValueError(f"encoder_weights is FAT-Net's ResNet-34 (size='full') only; got it for {name!r} "
                         f"size={size!r}")
    return ImageInput(_net(name, in_channels, out_channels, size, encoder_weights), pad_multiple=PAD_MULTIPLE,
                      channels=in_channels)


__all__ = ["SEGMENTERS", "build_segmenter", "DCSAUNet", "XBoundFormer", "FATNet"]
