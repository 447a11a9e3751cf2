"""The classifier zoo (thesis §4.4.3 Tables 4.2–4.4, §4.7.2; §5.4.1 Table 5.1): torchvision architectures.

§4.7.2: VGG16, ResNet18, DenseNet121 and ViT "Base" with 16 × 16 patches, pretrained on ImageNet (weights from
pytorch.org), at 224 × 224, with only the final layer reinitialised. §5.4.1 adds EfficientNet-V2 (the S variant,
torchvision's smallest) and MobileNet-V2 for the skin-tone ensemble.

The architectures are torchvision's own at full size in every profile (the method is the architecture; the mini
profile scales data, epochs and input size instead). ImageNet weights come from a local file only
(``models.weights.imagenet.<name>`` in the full profile, resolved with :func:`classifier_weights`); without one
the network starts from scratch, and the chapter says so. At mini's 32 px ViT-B/16 keeps its 16 × 16 patches
(2 × 2 tokens): the patch size is the thesis's, and the ImageNet position embeddings, when loaded at a size other
than 224, are interpolated to the new grid with torchvision's ``interpolate_embeddings``.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn
from torchvision import models as tvm
from torchvision.models.vision_transformer import interpolate_embeddings

from ctrlgen.downstream.inputs import ImageInput, load_state_dict_file
from ctrlgen.models.registry import weight_path

CLASSIFIERS = ("vgg16", "resnet18", "densenet121", "vit_b_16", "efficientnet_v2_s", "mobilenet_v2")
IMAGENET_CLASSES = 1000
VIT_PATCH = 16  # §4.7.2 "Base variant with a 16x16 patch size"


def _backbone(name: str, image_size: int) -> nn.Module:
    """The torchvision network with its ImageNet head (1000 classes), untrained."""
    if name == "vit_b_16":
        return tvm.vit_b_16(weights=None, image_size=image_size)
    return getattr(tvm, name)(weights=None)


def _replace_head(net: nn.Module, name: str, num_classes: int) -> None:
    """Swap the final linear layer for a fresh one with ``num_classes`` outputs (§4.7.2: only it is reinitialised)."""
    if name in ("resnet18",):
        net.fc = nn.Linear(net.fc.in_features, num_classes)
    elif name == "densenet121":
        net.classifier = nn.Linear(net.classifier.in_features, num_classes)
    elif name == "vit_b_16":
        net.heads.head = nn.Linear(net.heads.head.in_features, num_classes)
    else:  # vgg16, efficientnet_v2_s, mobilenet_v2: a Sequential ending with the Linear
        last = len(net.classifier) - 1
        net.classifier[last] = nn.Linear(net.classifier[last].in_features, num_classes)


def build_classifier(name: str, num_classes: int, weights: str | Path | None = None,
                     image_size: int = 64) -> nn.Module:
    """A torchvision classifier behind :class:`ImageInput` (input ``(B, 3, H, W)`` in [0, 1], resized to
    ``image_size``, ImageNet-normalised); output logits ``(B, num_classes)``.

    ``weights``: a local torchvision ImageNet state dict of ``name`` (the file torchvision publishes), loaded in
    full before the head is replaced; ``None``: from scratch. A missing or mismatched file raises naming the path.
    """
    if name not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {name!r}; known: {', '.join(CLASSIFIERS)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if name == "vit_b_16" and image_size % VIT_PATCH:
        raise ValueError(f"vit_b_16 needs an image_size divisible by its patch size {VIT_PATCH}, got {image_size}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 pixels (five stride-2 stages), got {image_size}")
    net = _backbone(name, image_size)
    if weights is not None:
        transform = None
        if name == "vit_b_16" and image_size != 224:
            transform = lambda state: interpolate_embeddings(image_size, VIT_PATCH, state)  # noqa: E731
        load_state_dict_file(net, weights, f"torchvision's ImageNet state dict of {name}", transform)
    _replace_head(net, name, num_classes)
    return ImageInput(net, image_size=image_size)


def classifier_weights(cfg: Mapping[str, Any], name: str) -> Path | None:
    """The local ImageNet weight file the profile names for ``name`` (``models.weights.imagenet.<name>``,
    relative paths under the models root), or ``None`` when the profile leaves it empty (train from scratch)."""
    source = str(cfg["models"]["weights"]["imagenet"][name] or "")
    return weight_path(cfg, source, "file") if source else None


__all__ = ["CLASSIFIERS", "build_classifier", "classifier_weights"]
