"""Guidance (DESIGN.md §3 layer 5): loss terms (L_CA, L_SA, L_style) and the one latent refiner of Eq. (4.10)."""
from ctrlgen.guidance.layout import LayoutGuidance, layout_terms
from ctrlgen.guidance.losses import cross_attention_layout_loss, self_attention_layout_loss, style_loss
from ctrlgen.guidance.refiner import GuidanceRefiner
from ctrlgen.guidance.settings import LayoutGuidanceSettings
from ctrlgen.guidance.terms import (
    CrossAttentionLayoutTerm,
    GuidanceContext,
    GuidanceTerm,
    SelfAttentionLayoutTerm,
    SelfAttentionMaskTerm,
    StyleTerm,
    TokenMapMaskTerm,
    TokenMap,
    mask_at,
)

__all__ = ["GuidanceRefiner", "GuidanceContext", "GuidanceTerm", "TokenMap", "CrossAttentionLayoutTerm",
           "SelfAttentionLayoutTerm", "StyleTerm", "TokenMapMaskTerm", "SelfAttentionMaskTerm", "mask_at", "LayoutGuidance", "LayoutGuidanceSettings",
           "layout_terms",
           "cross_attention_layout_loss", "self_attention_layout_loss", "style_loss"]
