"""DiDGen (thesis chapter 4): DermPrompt (§4.3.2), region-aware finetuning (§4.3.3), training-free
lesion–mask pair generation (§4.3.4) and the further controls of §4.4.6."""
from ctrlgen.methods.didgen.dermprompt import (
    AttributeCaptioner,
    Caption,
    CaptionCache,
    CaptionerConfig,
    DermAttributes,
    DermPromptCaptioner,
    PromptSampler,
    PromptTooLongError,
    VLMCaptioner,
    captioner_from_profile,
    compose_prompt,
    dermprompt_vocabulary,
)
from ctrlgen.methods.didgen.pair_generation import (
    PairConfig,
    PairGenerator,
    PairResult,
    annotate_masks,
    augment_masks,
    condition_masks_from,
    validate_condition_masks,
)
from ctrlgen.methods.didgen.region_aware import (
    PLACEHOLDERS,
    RegionAwareConfig,
    region_aware_batches,
    region_aware_finetune,
    setup_placeholders,
)

__all__ = [
    "AttributeCaptioner", "Caption", "CaptionCache", "CaptionerConfig", "DermAttributes", "DermPromptCaptioner",
    "PromptSampler", "PromptTooLongError", "VLMCaptioner", "captioner_from_profile", "compose_prompt", "dermprompt_vocabulary",
    "PairConfig", "PairGenerator", "PairResult", "annotate_masks", "augment_masks", "condition_masks_from",
    "validate_condition_masks", "PLACEHOLDERS", "RegionAwareConfig", "region_aware_batches", "region_aware_finetune",
    "setup_placeholders",
]
