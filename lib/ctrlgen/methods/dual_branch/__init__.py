"""The dual-branch controllable generator of thesis chapter 5 (§5.3.3, Algorithm 3): style reference inversion,
joint layout + style refinement (Eq. 5.8–5.9), bifurcation into a layout and a style branch run in one batched
U-Net call (Eq. 5.10, Fig. 5.3), mask annotation (Eq. 5.11); the two-stage layout-then-style baseline
(StyleID-style injection, 2T passes) and the single-branch ablation (§5.5.5); low-contrast targets (§5.5.1);
pass counting and timing."""
from ctrlgen.methods.dual_branch.comparison import TARGET_WALL_RATIO, compare_efficiency
from ctrlgen.methods.dual_branch.efficiency import UNetCalls, median_seconds, medians
from ctrlgen.methods.dual_branch.generation import (
    DualBranchConfig,
    DualBranchGenerator,
    DualBranchResult,
    LayoutBranchRefiner,
    StepRange,
    StyleBatch,
    StyleReference,
    check_reference,
    invert_style,
    style_image_tensor,
)
from ctrlgen.methods.dual_branch.styleid import (
    STYLEID_GAMMA,
    STYLEID_TEMPERATURE,
    QueryRecorder,
    QueryStore,
    StyleIDInjector,
)
from ctrlgen.methods.dual_branch.single_branch import single_branch_generate
from ctrlgen.methods.dual_branch.targets import StyleTargets, low_contrast_subset, style_targets
from ctrlgen.methods.dual_branch.two_stage import two_stage_generate

__all__ = [
    "DualBranchConfig", "DualBranchGenerator", "DualBranchResult", "LayoutBranchRefiner", "StepRange", "StyleBatch",
    "StyleReference", "check_reference", "invert_style", "style_image_tensor", "two_stage_generate",
    "single_branch_generate",
    "QueryRecorder", "QueryStore", "StyleIDInjector", "STYLEID_GAMMA", "STYLEID_TEMPERATURE",
    "UNetCalls", "median_seconds", "medians", "compare_efficiency", "TARGET_WALL_RATIO",
    "StyleTargets", "low_contrast_subset", "style_targets",
]
