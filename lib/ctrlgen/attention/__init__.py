"""Attention toolkit (DESIGN.md §3 layer 4): capture maps, operate on them, record and inject self-attention K/V."""
from ctrlgen.attention.capture import AttentionCapture, AttentionStore, CaptureProcessor
from ctrlgen.attention.kv import KVInjector, KVRecorder, KVSelection, KVStore, interleave_branches, split_branches
from ctrlgen.attention.layers import AttentionLayer, attention_layers, available_resolutions, select_layers
from ctrlgen.attention.maps import (
    affinity_ratio,
    attention_score,
    cross_self_map,
    delta_mask,
    diagonal_mass,
    gaussian_smooth,
    normalize_minmax,
    normalize_sum,
    otsu_mask,
    otsu_threshold,
    resize_maps,
    select_tokens,
    self_enhance,
    suppress,
    text_token_softmax,
    topk_mean,
)

__all__ = [
    "AttentionCapture", "AttentionStore", "CaptureProcessor", "KVInjector", "KVRecorder", "KVSelection", "KVStore",
    "interleave_branches", "split_branches", "AttentionLayer", "attention_layers", "available_resolutions",
    "select_layers", "affinity_ratio", "attention_score", "cross_self_map", "delta_mask", "diagonal_mass",
    "gaussian_smooth", "normalize_minmax", "normalize_sum", "otsu_mask", "otsu_threshold", "resize_maps",
    "select_tokens", "self_enhance", "suppress", "text_token_softmax", "topk_mean",
]
