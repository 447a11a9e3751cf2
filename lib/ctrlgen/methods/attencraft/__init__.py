"""AttenCraft (thesis chapter 3, Algorithm 1): attention-based disentanglement of multiple concepts from one image.

* ``masks``    — Stage I: cross-attention suppression, self-attention enhancement, delta masking (Eq. 3.1–3.3)
  and the attention scores of Eq. (3.4), for any number of concepts;
* ``sampling`` — the adaptive sampling ratios (Eq. 3.5) and the subset sampler (ω);
* ``training`` — Stage II, feature-retaining training (Eq. 3.6–3.8), only cross-attention W_k/W_v trained.
"""
from ctrlgen.methods.attencraft.masks import MaskSettings, StageOne, concept_masks, mask_iou, refined_maps, stage_one, token_maps
from ctrlgen.methods.attencraft.sampling import SubsetSampler, sampling_ratios, union_sampler, whole_group
from ctrlgen.methods.attencraft.training import (AttenCraftConfig, AttenCraftResult, FeatureRetainingTerm,
                                                 attencraft_finetune, prepare)

__all__ = ["MaskSettings", "StageOne", "concept_masks", "mask_iou", "refined_maps", "stage_one", "token_maps",
           "SubsetSampler", "sampling_ratios", "union_sampler", "whole_group", "AttenCraftConfig", "AttenCraftResult",
           "FeatureRetainingTerm", "attencraft_finetune", "prepare"]
