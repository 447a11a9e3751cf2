"""What every downstream model does to its input first: resize (classifiers), pad (segmenters), normalise."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# torchvision's ImageNet statistics: the weights the full profile loads were trained on inputs normalised so.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageInput(nn.Module):
    """``net`` behind the book's image convention: input float ``(B, 3, H, W)`` in [0, 1].

    ``image_size``: resize to a square of this side first (a classifier's input size, §4.7.2's 224 × 224 in full).
    ``pad_multiple``: pad the bottom/right edges (replicating the border) to a multiple of this side and crop the
    output back to ``(H, W)`` — segmenters downsample by 2^k, and their logits must come back at the input size.
    Then ImageNet normalisation of RGB input (the pretrained encoders expect it; harmless from scratch); inputs
    with ``channels`` other than 3 are passed as they are.
    """

    def __init__(self, net: nn.Module, image_size: int | None = None, pad_multiple: int = 1, channels: int = 3):
        super().__init__()
        self.net = net
        self.channels = channels
        self.image_size = image_size
        self.pad_multiple = pad_multiple
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"expected images (B, {self.channels}, H, W) in [0, 1], got shape {tuple(x.shape)}")
        if self.image_size and tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=True)
        if self.channels == 3:
            x = (x - self.mean) / self.std
        h, w = x.shape[-2:]
        m = self.pad_multiple
        pad_h, pad_w = (-h) % m, (-w) % m
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        out = self.net(x)
        return out[..., :h, :w] if (pad_h or pad_w) else out

    def auxiliary_loss(self, masks: torch.Tensor) -> torch.Tensor | None:
        """The wrapped net's auxiliary training loss on the last forward pass (XBound-Former's boundary loss), if any;
        ``masks`` ``(B, 1, H, W)`` are padded with background as the images were, so both stay aligned."""
        aux = getattr(self.net, "auxiliary_loss", None)
        if aux is None:
            return None
        h, w = masks.shape[-2:]
        return aux(F.pad(masks, (0, (-w) % self.pad_multiple, 0, (-h) % self.pad_multiple)))


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 images ``(N, H, W, 3)`` resized to ``size`` × ``size`` (:func:`_resample`), still uint8."""
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 images (N, H, W, 3), got {arr.dtype} {arr.shape}")
    if arr.shape[1:3] == (size, size):
        return arr
    x = _resample(torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float(), size)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def resize_masks(masks: np.ndarray, size: int) -> np.ndarray:
    """Boolean masks ``(N, H, W)`` resized to ``size`` × ``size`` (:func:`_resample` of the 0/1 map), lesion where the
    resampled value is at least 0.5 (at least half of a shrunk pixel's area)."""
    arr = np.asarray(masks)
    if arr.ndim != 3:
        raise ValueError(f"expected masks (N, H, W), got shape {arr.shape}")
    if arr.shape[1:] == (size, size):
        return arr.astype(bool)
    return (_resample(torch.from_numpy(arr.astype(np.float32))[:, None], size)[:, 0] >= 0.5).numpy()


def _resample(x: torch.Tensor, size: int) -> torch.Tensor:
    """Area averaging when shrinking (each output pixel the mean of the input pixels it covers, no aliasing),
    bilinear when enlarging."""
    mode = "area" if size < min(x.shape[-2:]) else "bilinear"
    return F.interpolate(x, size=(size, size), mode=mode, **({} if mode == "area" else {"align_corners": False}))


def load_state_dict_file(module: nn.Module, path: str | Path, what: str,
                         transform=None) -> None:
    """Load the state dict saved at ``path`` into ``module`` strictly, or raise naming the path and what was expected.

    ``transform``: applied to the loaded dict first (e.g. ViT position embeddings resized to another input size).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; expected {what} (a torch state dict saved with torch.save)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch errors alike: the file is not a state dict
        raise ValueError(f"{path}: cannot be read as a torch state dict ({type(err).__name__}: {err}); "
                         f"expected {what}") from err
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a state dict; expected {what}")
    if transform is not None:
        state = transform(state)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        ours, theirs = set(module.state_dict()), set(state)
        raise ValueError(f"{path}: does not match {what}: {len(ours - theirs)} missing keys "
                         f"(e.g. {sorted(ours - theirs)[:3]}), {len(theirs - ours)} unexpected keys "
                         f"(e.g. {sorted(theirs - ours)[:3]}); {str(err).splitlines()[0]}") from err
