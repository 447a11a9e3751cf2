"""Image metrics of Table 4.1 (§4.4.2, §4.7.1): FID (Eq. 4.12), MS-SSIM (Eq. 4.13–4.16), LPIPS (Eq. 4.17).

Feature extractors come from the profile (``didgen.metrics``) and are never downloaded:

* full — FID on the **standard FID network** (Heusel et al. 2017's TensorFlow Inception-v3 of
  2015-12-05, ported to PyTorch by torch-fidelity; torchmetrics' ``FrechetInceptionDistance`` runs it
  as ``NoTrainInceptionV3``): 2048-d pool3 features of images quantised to uint8 and scaled to
  [-1, 1] inside the network, weights from a local file (``inception_weights``: torch-fidelity's
  ``weights-inception-2015-12-05-6726825d.pth``; pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``
  has the same keys). FID values are torchmetrics' FID with those weights. LPIPS with AlexNet + the
  LPIPS linear layers (``alexnet_weights``: torchvision's ``alexnet-owt-7be5be79.pth`` state dict;
  ``lpips_weights``: the lpips package's v0.1 ``alex.pth``, keys ``lin{l}.model.1.weight``; "" = the
  copy torchmetrics ships in ``functional/image/lpips_models/alex.pth``).
* mini/smoke — no ImageNet network exists offline, so the extractor is an **encoder trained on the
  domain's real images**: the mini VAE encoder that ``ctrlgen pretrain`` trained on the training
  images (``VAEEncoderFeatures``). FID is then the Fréchet distance of pooled encoder activations and
  "LPIPS" is Eq. 4.17 on the same encoder's layers with uniform weights w_l = 1 — a perceptual
  distance of the same form, not the published LPIPS. Table captions must say so.

Any ``torch.nn.Module`` mapping images ``(B, 3, H, W)`` in [0, 1] to features ``(B, D)`` can be
passed to ``fid`` (torchmetrics' ``FrechetInceptionDistance`` with a custom feature module), and any
module returning a list of feature maps to ``PerceptualDistance``.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchmetrics.functional.image.lpips as tm_lpips
from scipy import linalg
from diffusers.models.autoencoders.vae import EncoderTiny
from torch import nn
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as msssim
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
from torchvision.models import alexnet

from ctrlgen.metrics.overlap import iou
from ctrlgen.models.registry import models_root


# ================================================================================================ FID
def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Eq. (4.12): ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^{1/2}) (closed form, scipy's sqrtm)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    covmean = linalg.sqrtm(s1 @ s2)
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def fid(real: torch.Tensor, fake: torch.Tensor, extractor: nn.Module, batch_size: int = 64) -> float:
    """Eq. (4.12) between image sets ``(N, 3, H, W)`` in [0, 1] with ``extractor`` as the feature network
    (torchmetrics ``FrechetInceptionDistance(feature=extractor)``; with ``InceptionFeatures`` this is
    torchmetrics' standard FID). Batches run on the extractor's device."""
    device = next((t.device for t in extractor.parameters()), torch.device("cpu"))
    with torch.no_grad():
        metric = FrechetInceptionDistance(feature=_WithFeatureCount(extractor, real[:1].to(device)),
                                          normalize=True).to(device)
        for images, is_real in ((real, True), (fake, False)):
            for start in range(0, len(images), batch_size):
                metric.update(images[start:start + batch_size].to(device), real=is_real)
        return float(metric.compute())


class _WithFeatureCount(nn.Module):
    """Gives torchmetrics the feature count without it probing with a 299x299 dummy image."""

    def __init__(self, extractor: nn.Module, example: torch.Tensor):
        super().__init__()
        self.extractor = extractor.eval()
        count = getattr(extractor, "num_features", None)
        if count is None:
            with torch.no_grad():
                count = self.extractor(example).reshape(1, -1).shape[1]
        self.num_features = int(count)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.extractor(x).reshape(x.shape[0], -1)


INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's release file of the FID network


def inception_weights_file(weights_path: str | Path) -> Path:
    """The local FID-Inception weights file, or one ``FileNotFoundError`` naming the path expected (never downloads)."""
    p = Path(weights_path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(
            f"no FID Inception-v3 weights at {p}: put torch-fidelity's {INCEPTION_WEIGHTS_NAME} there (the file of "
            "torch_fidelity.feature_extractor_inceptionv3.URL_INCEPTION_V3; pytorch-fid's "
            "pt_inception-2015-12-05-6726825d.pth is the same network) or set didgen.metrics.inception_weights")
    return p


class InceptionFeatures(nn.Module):
    """The standard FID feature network for Eq. (4.12): 2048-d pool3 features of the TF Inception-v3 (2015-12-05).

    torchmetrics' ``NoTrainInceptionV3`` (torch-fidelity's ``FeatureExtractorInceptionV3``) with its weights from
    the local file ``weights_path``. Input ``(B, 3, H, W)`` in [0, 1], turned to uint8 as torchmetrics'
    ``FrechetInceptionDistance(normalize=True)`` does (``(x * 255).byte()``); the network resizes to 299x299
    (``antialias=True``: torchmetrics' default bilinear resize; False: torch-fidelity's TF1-style resize) and
    scales to [-1, 1] itself, as the TF graph did.
    """

    num_features = 2048

    def __init__(self, weights_path: str | Path, antialias: bool = True):
        super().__init__()
        p = inception_weights_file(weights_path)
        try:
            self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(self.num_features)],
                                          feature_extractor_weights_path=str(p), antialias=antialias)
        except RuntimeError as err:  # load_state_dict: missing/unexpected keys or shape mismatches
            raise ValueError(f"{p} is not the FID Inception-v3 state dict ({INCEPTION_WEIGHTS_NAME}: "
                             f"Conv2d_1a_3x3 … Mixed_7c, fc 2048→1008): {str(err).splitlines()[0]}") from None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > 1:
            raise ValueError(f"InceptionFeatures expects images in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")
        return self.net((x * 255).byte())


# ================================================================================================ domain encoder
class VAEEncoderFeatures(nn.Module):
    """Features of a (mini) VAE encoder trained on the domain's real images (mini/smoke profiles).

    ``forward`` → FID features: the activation at the end of every resolution level and the latent (its mean
    for an ``AutoencoderKL``), each average-pooled to ``grid`` x ``grid`` and flattened, concatenated.
    ``layers`` → the list of feature maps used by ``PerceptualDistance``. Input ``(B, 3, H, W)`` in [0, 1].
    Works on ``AutoencoderKL`` (its down blocks) and ``AutoencoderTiny`` (the mini VAE: the block before each
    stride-2 convolution).
    """

    def __init__(self, vae: nn.Module, grid: int = 2):
        super().__init__()
        self.encoder = vae.encoder.eval()
        self.quant = getattr(vae, "quant_conv", None)
        self.grid = grid

    def layers(self, x: torch.Tensor) -> list[torch.Tensor]:
        if isinstance(self.encoder, EncoderTiny):
            return self._tiny_layers(x)
        enc = self.encoder
        h = enc.conv_in(x.float() * 2 - 1)
        out = []
        for block in enc.down_blocks:
            h = block(h)
            out.append(h)
        h = enc.mid_block(h)
        h = enc.conv_out(enc.conv_act(enc.conv_norm_out(h)))
        if self.quant is not None:
            h = self.quant(h)
        out.append(h[:, : h.shape[1] // 2])  # latent mean
        return out

    def _tiny_layers(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, out = x.float(), []  # EncoderTiny reads images in [0, 1] (TAESD's convention)
        last = len(self.encoder.layers) - 1  # the latent projection
        for i, layer in enumerate(self.encoder.layers):
            if i == last or (isinstance(layer, nn.Conv2d) and layer.stride == (2, 2)):
                out.append(h)  # the end of a resolution level
            h = layer(h)
        out.append(h)  # the latent
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.adaptive_avg_pool2d(f, self.grid).flatten(1) for f in self.layers(x)], 1)


# ================================================================================================ LPIPS
def _unit(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (x.pow(2).sum(1, keepdim=True).sqrt() + eps)


class PerceptualDistance(nn.Module):
    """Eq. (4.17): d(r, g) = Σ_l mean_{h,w} ‖w_l ⊙ (r̂_l − ĝ_l)‖², r̂ channel-unit-normalised features.

    ``layers_fn(x) -> list of (B, C_l, H_l, W_l)``; ``weights``: one non-negative vector per layer
    (LPIPS's learned w_l) or None for w_l = 1. ``shift``/``scale``: input normalisation applied to
    images in [-1, 1] (LPIPS's ScalingLayer for AlexNet). Inputs are images in [0, 1].
    """

    def __init__(self, layers_fn, weights: Sequence[torch.Tensor] | None = None,
                 shift: Sequence[float] | None = None, scale: Sequence[float] | None = None):
        super().__init__()
        self.layers_fn = layers_fn
        self.weights = None if weights is None else [w.flatten().float() for w in weights]
        self.shift = None if shift is None else torch.tensor(shift).view(1, 3, 1, 1)
        self.scale = None if scale is None else torch.tensor(scale).view(1, 3, 1, 1)

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        if self.shift is None:
            return x.float()
        return ((x.float() * 2 - 1) - self.shift.to(x.device)) / self.scale.to(x.device)

    def unit_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The channel-unit-normalised feature maps r̂_l of images ``x`` in [0, 1]."""
        return [_unit(f) for f in self.layers_fn(self._prep(x))]

    def from_features(self, fa: Sequence[torch.Tensor], fb: Sequence[torch.Tensor]) -> torch.Tensor:
        """Eq. (4.17) from ``unit_features`` of two aligned batches."""
        total = torch.zeros(fa[0].shape[0], device=fa[0].device)
        for i, (x, y) in enumerate(zip(fa, fb)):
            d = (x - y) ** 2
            if self.weights is not None:
                d = d * self.weights[i].to(d.device).view(1, -1, 1, 1)
            total = total + d.sum(1).mean((-2, -1))
        return total

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.from_features(self.unit_features(a), self.unit_features(b))


def shipped_lpips_alex() -> Path:
    """The lpips package's v0.1 AlexNet linear layers as torchmetrics ships them (``lpips_models/alex.pth``)."""
    return Path(tm_lpips.__file__).parent / "lpips_models" / "alex.pth"


def alexnet_lpips(alexnet_weights: str | Path, lpips_weights: str | Path | None = None) -> PerceptualDistance:
    """The published LPIPS (AlexNet, v0.1; Eq. 4.17 with learned w_l) from local files: torchvision AlexNet
    weights and the lpips package's ``alex.pth`` linear layers (None: the copy torchmetrics ships).
    Full profile; nothing is downloaded."""
    lpips_weights = shipped_lpips_alex() if lpips_weights is None else lpips_weights
    for p, what, key in ((alexnet_weights, "torchvision alexnet state dict (alexnet-owt-7be5be79.pth)", "alexnet"),
                         (lpips_weights, "LPIPS linear weights (lpips/weights/v0.1/alex.pth)", "lpips")):
        if not Path(p).expanduser().is_file():
            raise FileNotFoundError(f"no {what} at {p}: put the file there or set didgen.metrics.{key}_weights")
    net = alexnet(weights=None)
    net.load_state_dict(torch.load(Path(alexnet_weights).expanduser(), map_location="cpu", weights_only=True))
    feats = net.features.eval()
    cuts = [(0, 2), (2, 5), (5, 8), (8, 10), (10, 12)]  # relu1 … relu5, as lpips.pretrained_networks.alexnet

    def layers(x: torch.Tensor) -> list[torch.Tensor]:
        out, h = [], x
        for lo, hi in cuts:
            for m in list(feats)[lo:hi]:
                h = m(h)
            out.append(h)
        return out

    lin = torch.load(Path(lpips_weights).expanduser(), map_location="cpu", weights_only=True)
    weights = [lin[f"lin{i}.model.1.weight"] for i in range(5)]
    return PerceptualDistance(layers, weights, shift=(-0.030, -0.088, -0.188), scale=(0.458, 0.448, 0.450))


def encoder_perceptual_distance(features: VAEEncoderFeatures) -> PerceptualDistance:
    """Eq. (4.17) on a domain encoder's layers with w_l = 1 (mini/smoke stand-in for LPIPS)."""
    return PerceptualDistance(features.layers)


def _pairs(n: int, n_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if n < 2:
        raise ValueError("within-set diversity needs at least two images")
    all_pairs = n * (n - 1) // 2
    if n_pairs <= 0 or n_pairs >= all_pairs:
        i, j = np.triu_indices(n, 1)
        return i, j
    i = rng.integers(0, n, n_pairs)
    j = (i + rng.integers(1, n, n_pairs)) % n
    return i, j


@torch.no_grad()
def within_set_diversity(images: torch.Tensor, distance: nn.Module, n_pairs: int = 0, seed: int = 0,
                         batch_size: int = 64) -> float:
    """Mean perceptual distance over pairs of distinct images of one set (Table 4.1 "LPIPS ↑", Table 4.7).

    ``n_pairs`` 0: every pair; otherwise that many random pairs (seeded). Masks ``(N, H, W)`` are
    repeated to three channels."""
    x = images.float()
    if x.ndim == 3:
        x = x[:, None]
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    i, j = _pairs(len(x), n_pairs, seed)
    if isinstance(distance, PerceptualDistance) and _feature_bytes(distance, x) <= FEATURE_CACHE_BYTES:
        # each image's features once, then every pair from them (a pair-by-pair pass re-encodes each image
        # ~2·n_pairs/N times)
        chunks = [distance.unit_features(x[s:s + batch_size]) for s in range(0, len(x), batch_size)]
        feats = [torch.cat(layer) for layer in zip(*chunks)]
        pick = lambda idx: [f[torch.as_tensor(idx)] for f in feats]  # noqa: E731
        vals = [distance.from_features(pick(i[s:s + batch_size]), pick(j[s:s + batch_size]))
                for s in range(0, len(i), batch_size)]
    else:
        vals = [distance(x[i[s:s + batch_size]], x[j[s:s + batch_size]]) for s in range(0, len(i), batch_size)]
    return float(torch.cat(vals).mean())


def mask_set_diversity(masks: torch.Tensor | np.ndarray, n_pairs: int = 0, seed: int = 0) -> float:
    """Mean 1 − IoU over pairs of distinct binary masks ``(N, H, W)`` of one set (same pairs as
    ``within_set_diversity`` with the same ``n_pairs``/``seed``): shape diversity with no feature
    extractor, 0 for identical masks, 1 for disjoint ones (two empty masks count as identical)."""
    m = np.asarray(masks)
    i, j = _pairs(len(m), n_pairs, seed)
    return float((1 - iou(m[np.asarray(i)], m[np.asarray(j)])).mean())


FEATURE_CACHE_BYTES = 2 * 2**30  # keep every image's features in memory only below this (peak memory bounded)


def _feature_bytes(distance: "PerceptualDistance", x: torch.Tensor) -> int:
    with torch.no_grad():
        one = distance.unit_features(x[:1])
    return len(x) * sum(f.numel() * f.element_size() for f in one)


# ================================================================================================ MS-SSIM
def ms_ssim(preds: torch.Tensor, target: torch.Tensor, scales: int = 5, kernel_size: int = 11) -> torch.Tensor:
    """Per-pair MS-SSIM (Eq. 4.13–4.16, torchmetrics) of images ``(N, 3, H, W)`` in [0, 1].

    ``scales`` uses the first weights of Wang et al. (renormalised); small images need fewer scales:
    the side must exceed ``(kernel_size − 1) · 2^(scales − 1)`` (64 px: 3 scales with an 11 kernel).
    """
    betas = torch.tensor((0.0448, 0.2856, 0.3001, 0.2363, 0.1333)[:scales])
    betas = tuple((betas / betas.sum()).tolist())
    return msssim(preds.float(), target.float(), data_range=1.0, kernel_size=kernel_size, betas=betas,
                  reduction="none", normalize="relu")


def ms_ssim_between(generated: torch.Tensor, real: torch.Tensor, n_pairs: int = 0, seed: int = 0, scales: int = 5,
                    kernel_size: int = 11) -> float:
    """Mean MS-SSIM between generated and real images over random (generated, real) pairs (Table 4.1);
    ``n_pairs`` 0: one pair per generated image."""
    rng = np.random.default_rng(seed)
    n = n_pairs or len(generated)
    gi = rng.integers(0, len(generated), n) if n_pairs else np.arange(len(generated))
    ri = rng.integers(0, len(real), n)
    return float(ms_ssim(generated[gi], real[ri], scales, kernel_size).mean())


# ================================================================================================ from the profile
def metric_extractors(cfg, vae: nn.Module | None = None) -> tuple[nn.Module, nn.Module, str]:
    """``(fid_features, perceptual_distance, description)`` for the profile's ``didgen.metrics``.

    ``extractor: "inception"`` (full) reads the local weight files (relative paths: under the models root); ``"domain_vae"`` (mini/smoke) uses
    ``vae`` — the mini VAE trained on the domain's real images (pass ``load_base_model(cfg, "derm").vae``).
    """
    m = cfg["didgen"]["metrics"]
    kind = str(m["extractor"])
    if kind == "inception":
        root = models_root(cfg)
        path = lambda key: Path(m[key]).expanduser() if Path(m[key]).expanduser().is_absolute() else root / m[key]  # noqa: E731
        lpips_lin = path("lpips_weights") if str(m["lpips_weights"]) else None  # "": torchmetrics' shipped copy
        return (InceptionFeatures(path("inception_weights")), alexnet_lpips(path("alexnet_weights"), lpips_lin),
                "FID on the standard FID Inception-v3 (torchmetrics/torch-fidelity, 2048-d pool3); LPIPS (AlexNet, v0.1)")
    if kind == "domain_vae":
        if vae is None:
            raise ValueError("didgen.metrics.extractor is 'domain_vae': pass the domain's VAE (trained on its real images)")
        feats = VAEEncoderFeatures(vae, int(m["feature_grid"]))
        return (feats, encoder_perceptual_distance(feats),
                "FID and LPIPS-form distance (Eq. 4.17, w_l = 1) on the features of the mini VAE encoder trained on the "
                "domain's real images — not Inception/AlexNet; values are not comparable with the thesis's")
    raise ValueError(f"unknown didgen.metrics.extractor {kind!r}: inception or domain_vae")


__all__ = ["frechet_distance", "fid", "INCEPTION_WEIGHTS_NAME", "inception_weights_file", "InceptionFeatures",
           "shipped_lpips_alex", "VAEEncoderFeatures", "PerceptualDistance", "alexnet_lpips",
           "encoder_perceptual_distance", "within_set_diversity", "mask_set_diversity", "ms_ssim", "ms_ssim_between", "metric_extractors"]
