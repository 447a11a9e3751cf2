"""Guidance (DESIGN.md §3 layer 5): layout losses L_CA, L_SA, the style loss and the latent refiner of Eq. (4.10)."""
from ctrlgen.guidance.layout import LayoutGuidance
from ctrlgen.guidance.losses import cross_attention_layout_loss, self_attention_layout_loss, style_loss

__all__ = ["LayoutGuidance", "cross_attention_layout_loss", "self_attention_layout_loss", "style_loss"]
