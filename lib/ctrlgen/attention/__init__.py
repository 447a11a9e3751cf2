"""Attention toolkit (DESIGN.md §3 layer 4): capture maps, operate on them, record and inject self-attention K/V.

Every processor here is a subclass of ``AttentionProcessorBase`` and every context manager a
``ProcessorSwap`` (``processor.py``): the one extension point for attention control.
"""
from ctrlgen.attention.capture import AttentionCapture, AttentionStore, CaptureProcessor
from ctrlgen.attention.dual_branch import DECODER_SELF_ATTENTION, DualBranchInjector
from ctrlgen.attention.kv import (
    KVInjector,
    KVInjectProcessor,
    KVRecorder,
    KVRecordProcessor,
    KVSelection,
    KVStore,
    interleave_branches,
    split_branches,
)
from ctrlgen.attention.processor import AttentionProcessorBase, ProcessorSwap, Projected
from ctrlgen.attention.prompt_to_prompt import PromptToPrompt
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
    "AttentionProcessorBase", "ProcessorSwap", "Projected", "PromptToPrompt", "DualBranchInjector",
    "DECODER_SELF_ATTENTION", "KVInjectProcessor", "KVRecordProcessor",
    "AttentionCapture", "AttentionStore", "CaptureProcessor", "KVInjector", "KVRecorder", "KVSelection", "KVStore",
    "interleave_branches", "split_branches", "AttentionLayer", "attention_layers", "available_resolutions",
    "select_layers", "affinity_ratio", "attention_score", "cross_self_map", "delta_mask", "diagonal_mass",
    "gaussian_smooth", "normalize_minmax", "normalize_sum", "otsu_mask", "otsu_threshold", "resize_maps",
    "select_tokens", "self_enhance", "suppress", "text_token_softmax", "topk_mean",
]
