# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python (ctrlgen)
#     language: python
#     name: ctrlgen
# ---

# %% [markdown]
# # Chapter 5 — Low-contrast bias in lesion segmentation: finding it, and mitigating it
#
# Thesis chapter 5 asks *which* image attribute makes lesion segmenters fail. It annotates every image with a
# skin-tone group (an ensemble annotator, §5.4.1, Table 5.1) and with fine-grained attributes (§5.3.2: ITA Skin,
# ITA Lesion, their difference, lesion area, circularity), trains three segmenters (AttenU-Net, DCSAU-Net, FAT-Net),
# and compares the attributes of the poorly segmented subsets S_0.8 and S_0.6 with the whole test set (Fig. 5.4).
# Its finding: low lesion–skin contrast (small ITA Difference), not skin tone, concentrates the failures. It then
# generates low-contrast lesion–mask pairs with a dual-branch diffusion model (§5.3.3, Algorithm 3) and finetunes
# the segmenters on them (§5.5, Tables 5.3–5.5).
#
# This chapter runs the bias identification in full and the mitigation controls that need no generator
# ("Training Sample (Random)" and "(Target)"). Rows whose generator this book does not have yet read "not run",
# with the reason. Every number is computed by this run; the thesis's numbers appear only in columns labelled
# "thesis". Where the distributions "shift", the shift is a test result here: a two-sample Kolmogorov–Smirnov test
# and a permutation test on the mean of S_θ against the rest of the set (χ² for the skin-tone groups).

# %% tags=["parameters"]
profile = "mini"
overrides = {}

# %% tags=["hide-input"]
import numpy as np
import pandas as pd
import torch

from ctrlgen import figures
from ctrlgen.analysis import bias
from ctrlgen.experiments import ch04_didgen
from ctrlgen.experiments import ch05_lowcontrast as ch05
from ctrlgen.metrics.image import mask_set_diversity, metric_extractors, within_set_diversity
from ctrlgen.results import ChapterRun
from ctrlgen.thesis import compare
from ctrlgen.thesis.claims import claim_seeds, record_claim

# %% tags=["hide-input"]
run = ChapterRun.start("ch05_lowcontrast", profile, overrides)
cfg = run.cfg
cc = ch05.Ch05Config.from_profile(cfg)
print(f"profile {cfg.profile_name}: segmenters {', '.join(cc.segmenters)} ({cc.segmenter_size}), "
      f"at most {cc.seg_fit.max_epochs} epochs; skin-tone base models at {cc.tone_fit.image_size} px")

# %% [markdown]
# ## Skin-tone annotation — Table 5.1 (§5.4.1)
#
# The thesis finetunes six torchvision models on Fitzpatrick17k (80/20, lr 1e-3, batch 64, patience 10) to three
# groups (FST I-II, III-IV, V-VI), tests them on the class-balanced DDI, and stacks MobileNet-V2, ViT-B-16 and VGG-16
# with seven scikit-learn ensembles; logistic regression becomes the annotator. The two ITA baselines map the skin's
# ITA to a type with the thresholds of §5.2.2 (I > 55 ≥ II > 41 ≥ III > 28 ≥ IV > 19 ≥ V > 10 ≥ VI). Fitzpatrick17k
# and DDI images are not available here, so the same pipeline runs on the procedural dermoscopy world, whose skin
# ITA is a control (known labels); the ensembles are fitted on the base models' validation predictions.

# %%
tone = ch05.tone_data(cc)
print(tone.note)
run.note(tone.note)
data = ch05.bias_data(cfg, cc)
print("bias analysis:", data.source)
run.note(f"bias analysis data: {data.source}")
preds = ch05.base_predictions(cfg, cc, tone, data.test.images)
t51 = ch05.table_5_1(cc, tone, preds)
run.log_table("5.1", t51.table)
compare("5.1", t51.table, cfg.profile_name)

# %% [markdown]
# ## Attributes of every test image (§5.3.2)
#
# Skin tone by the annotator above; ITA Skin / Lesion from the mean CIELAB L*, b* of each region (Eq. 5.1, as the
# quadrant-aware angle); ITA Difference = ITA Skin − ITA Lesion; lesion area ratio; circularity 4πS/P² (Eq. 5.2).

# %%
attrs = ch05.annotate(data.test.images, data.test.masks, skin_tone=t51.extra_groups)
attrs[["skin_tone", "ita_skin", "ita_lesion", "ita_difference", "area_ratio", "circularity"]].describe(include="all").T

# %% [markdown]
# ## Segmenters and their poorly segmented subsets (§5.4.2)
#
# AttenU-Net, DCSAU-Net and FAT-Net (the book's downstream zoo; thesis settings in `full`: batch 24, lr 1e-3,
# patience 20) train on the training split with early stopping on the validation IoU. S_θ = test images with
# IoU < θ.

# %%
segmenters, pretrained = {}, {}
for name in cc.segmenters:
    model, stored = ch05.pretrained_segmenter(cfg, cc, name, data)
    segmenters[name] = (model, stored)
    pretrained[name] = ch05.scores(model, data.test.images, data.test.masks, cc.seg_fit.batch_size)
iou_by_model = {ch05.SEGMENTER_NAMES[n]: pretrained[n]["iou"] for n in cc.segmenters}
overview = pd.DataFrame({m: {"mean IoU": v.mean(), "mean Dice": pretrained[n]["dice"].mean(),
                             **{f"|{k}|": int(s.sum()) for k, s in ch05.poor_subsets(v, cc.thresholds).items()}}
                         for (n, (m, v)) in zip(cc.segmenters, iou_by_model.items())}).T
run.log_table("ch05.segmenters", overview)
overview

# %% [markdown]
# ### Does an attribute differ where the models fail? — Fig. 5.4 with tests
#
# One row per model, one column per attribute: the test set and its S_0.8, S_0.6 as densities. The table below
# gives each subset against the rest: the standardised mean shift, the KS (χ² for skin tone) and permutation
# p-values.

# %%
run.show(bias.histogram_grid(attrs, iou_by_model, cc.thresholds, title="Fig. 5.4 analogue: test set and poorly segmented subsets"),
         "fig_5_4_attributes")
shifts = bias.shift_table(attrs, iou_by_model, cc.shift)
run.log_table("ch05.distribution_shift", shifts.drop(columns=["test"]))
shifts[["n subset", "mean all", "mean subset", "standardised shift", "p (KS / chi2)", "p (permutation, mean)"]]

# %% [markdown]
# ### External set (§5.5.4, Fig. 5.8)
#
# The thesis re-tests the ISIC-trained models on HAM10000 with a third threshold S_0.4. Here: PH2 when the data root
# holds it.

# %%
print(data.external_note)
run.note(data.external_note)
if data.external is not None:
    ext_attrs = ch05.annotate(data.external.images, data.external.masks)
    ext_iou = {ch05.SEGMENTER_NAMES[n]: ch05.scores(m, data.external.images, data.external.masks, cc.seg_fit.batch_size)["iou"]
               for n, (m, _) in segmenters.items()}
    cols = ["ita_skin", "ita_lesion", "ita_difference"]
    run.show(bias.histogram_grid(ext_attrs, ext_iou, cc.external_thresholds, cols, title="Fig. 5.8 analogue (external set)"),
             "fig_5_8_external")
    ext_shift = bias.shift_table(ext_attrs, ext_iou, bias.ShiftSettings(cc.external_thresholds, cc.n_resamples, cc.seed), cols)
    run.log_table("ch05.external_shift", ext_shift.drop(columns=["test"]))
    display(ext_shift[["n subset", "standardised shift", "p (KS / chi2)", "p (permutation, mean)"]])

# %% [markdown]
# ## Mitigation — Table 5.3 (§5.5.1, §5.5.3)
#
# The low-contrast subset is the training images with ITA Difference below the profile's threshold (thesis: < 30,
# 569 ISIC images). "Training Sample (Target)" finetunes each pretrained segmenter on exactly those real images,
# "Training Sample (Random)" on as many random training images (the control for generic finetuning); finetuning
# uses the profile's lr and batch (thesis 1e-4, 24) with early stopping on the validation IoU. S_0.6 stays fixed per
# model from its pretrained predictions.
#
# "Mine" finetunes on dual-branch pairs (Algorithm 3): one pair per low-contrast training image (n = 1), styled by
# that image, laid out by its augmented mask, generated on chapter 4's region-aware model (its cache) with the
# prompt "An image of <lesion> on <skin>"; the mask is the layout branch's annotation (Eq. 5.11), and pairs whose
# annotation failed are dropped. Chapter 4's model was trained with DermPrompts, the thesis's with the prefix only:
# a deviation. η, T, the inversion's CFG and the decoder layers receiving the style K/V are the profile's
# (`dual_branch`, unstated in the thesis). The other generative rows read "not run", with the reason.

# %%
base, ch04_sets = ch04_didgen.load_base_and_sets(cfg)
region_aware = ch04_didgen.finetune(cfg, "mine", ch04_sets)  # chapter 4's cache (trained there; here only if absent)
mine = ch05.dual_branch_pairs(cfg, cc, data, region_aware.model, region_aware.key)
print(mine.note, "| U-Net passes:", mine.passes)
run.note(mine.note)
run.log_metric("ch05.dual_branch_pairs", "Mine", "pairs kept", len(mine.images))
run.log_metric("ch05.dual_branch_pairs", "Mine", "pairs requested", mine.requested)
if len(mine.images):
    k = min(6, len(mine.images))
    run.show(figures.image_grid_figure({"style reference": ch05.to_unit(data.train.images[mine.style_index[:k]]),
                                        "generated": ch05.to_unit(mine.images[:k]),
                                        "annotated mask": ch05.to_unit(mine.masks[:k])}, n=k,
                                       title="Fig. 5.6 analogue: dual-branch pairs"), "fig_5_6_dual_branch_pairs")

# %%
target = ch05.low_contrast_subset(data.train.images, data.train.masks, cc.low_contrast_threshold, cc.max_pairs)
random = ch05.random_subset(len(data.train), len(target), cc.seed)
print(f"low-contrast targets: {len(target)} of {len(data.train)} training images (ITA Difference < "
      f"{cc.low_contrast_threshold:g}, lowest first, at most ch05.mitigation.max_pairs = {cc.max_pairs or 'all'})")
run.log_metric("ch05.low_contrast_subset", "training images", "selected", len(target))
per_source = {}
for name, (model, stored) in segmenters.items():
    per_source[name] = {"Pretrained": pretrained[name]}
    for label, index in (("Training Sample (Random)", random), ("Training Sample (Target)", target)):
        per_source[name][label] = ch05.finetuned_scores(cfg, cc, name, stored, data.train.take(index), data, data.test, label)
    if len(mine.images):
        per_source[name]["Mine"] = ch05.finetuned_scores(cfg, cc, name, stored, mine.set, data, data.test, "Mine")
s06 = {n: pretrained[n]["iou"] < 0.6 for n in cc.segmenters}
t53 = ch05.mitigation_table(per_source, s06)
run.log_table("5.3", t53)
compare("5.3", t53, cfg.profile_name)

# %%
reasons = pd.DataFrame({"not run because": ch05.not_run_reasons()})
for source, why in reasons["not run because"].items():
    run.note(f"Table 5.3/5.4 row {source}: not run ({why})")
reasons

# %% [markdown]
# ### Efficiency (§5.5.5)
#
# The thesis counts denoising passes: one T-step trajectory for the dual-branch model against two sequential
# T-step processes for ControlNet + StyleID (the style reference's T-step inversion, which both need, precomputed).
# Measured here on one low-contrast reference and its mask: the U-Net calls of each method and the median wall time
# of three interleaved runs at equal steps, guidance backward passes included (the two-stage pipeline is the book's
# layout-then-StyleID-injection baseline on the same region-aware model).

# %%
eff = ch05.efficiency(cfg, region_aware.model, data.train.images[target[:1]], data.train.masks[target[:1]])
passes = pd.DataFrame(eff["passes"]).T
passes["median seconds"] = pd.Series(eff["seconds_median"])
for method, row in passes.iterrows():
    for column, value in row.items():
        (run.log_timing if column == "median seconds" else run.log_metric)("ch05.efficiency", method, column, value)
print(f"T = {eff['steps']}: denoising passes dual / two-stage = {eff['ratio_denoising_passes']:.2f}; "
      f"wall time dual / two-stage = {eff['ratio_wall_time']:.2f}")
passes

# %% [markdown]
# ### The role of layout guidance — Table 5.5 (§5.5.5)
#
# The same targets generated without L_CA and L_SA (the style loss kept), the segmenters finetuned on those pairs
# the same way. Diversity is the within-set perceptual distance of the annotated masks (the profile's extractor,
# as chapter 4's Table 4.7; LPIPS in the thesis), with the extractor-free mean 1 − IoU beside it.

# %%
_, distance, metric_note = metric_extractors(cfg, vae=base.vae)
plain = ch05.dual_branch_pairs(cfg, cc, data, region_aware.model, region_aware.key, layout_guidance=False)
print(plain.note)
run.note(plain.note)
arms = {"w/o layout guidance": plain, "w/ layout guidance (mine)": mine}
lpips_pairs = int(cfg.didgen.eval.lpips_pairs)
diversity = {arm: within_set_diversity(torch.from_numpy(p.masks), distance, lpips_pairs, cc.seed) if len(p.masks) > 1
             else float("nan") for arm, p in arms.items()}
iou_by_arm = {"w/ layout guidance (mine)": {n: per_source[n]["Mine"]["iou"] for n in per_source if "Mine" in per_source[n]},
              "w/o layout guidance": {}}
for name, (model, stored) in segmenters.items():
    if len(plain.images):
        iou_by_arm["w/o layout guidance"][name] = ch05.finetuned_scores(cfg, cc, name, stored, plain.set, data, data.test,
                                                                         "w/o layout guidance")["iou"]
t55 = ch05.table_5_5(diversity, iou_by_arm, s06)
run.log_table("5.5", t55)
display(compare("5.5", t55, cfg.profile_name))
pd.DataFrame({"1 − IoU ↑": {arm: mask_set_diversity(p.masks, lpips_pairs, cc.seed) if len(p.masks) > 1 else np.nan
                            for arm, p in arms.items()}})

# %% [markdown]
# Not run in this chapter yet: Table 5.2 (FID / LPIPS / DINO of the generated sets against their references), Table
# 5.4 (mitigation on the external set), Fig. 5.9 (single vs dual branch) and Fig. 5.10 (generation ratio
# n = 1..4) — the generator runs above; these comparisons are not wired yet.

# %% [markdown]
# ## The claims of this chapter
#
# Recorded: the layout-guidance ablation (Table 5.5: mask diversity; IoU per S_0.6 test image, the models pooled),
# the denoising-pass count of §5.5.5, the Table 5.1 comparison (logistic-regression ensemble vs the ITA baselines, per test image correct or
# not), the ITA Difference of S_0.6 against the rest (the models pooled), and the standardised shift of ITA
# Difference against ITA Skin per model. The mitigation claims wait for the generators.

# %%
seeds = claim_seeds(cfg)
lr_correct = t51.per_image_correct["Logistic Regression"].astype(float)
record_claim(run, "ch5.t51_dl_vs_ita", a=lr_correct,
             b={m: t51.per_image_correct[m].astype(float) for m in ("ITA w/ YCbCr", "8-patch ITA")}, seeds=seeds)
pooled = [ch05.split_for_claim(attrs["ita_difference"].to_numpy(), pretrained[n]["iou"], 0.6) for n in cc.segmenters]
poor = np.concatenate([p[0] for p in pooled])
rest = np.concatenate([p[1] for p in pooled])
record_claim(run, "ch5.s542_ita_difference", a=poor[np.isfinite(poor)], b=rest[np.isfinite(rest)], seeds=seeds,
             note="; ".join(sorted({p[2] for p in pooled})))
s06_shift = shifts.xs("S_0.6", level="subset")["standardised shift"].unstack()
record_claim(run, "ch5.s555_denoising_passes", a=[eff["passes"]["dual_branch"]["denoising"]],
             b=[eff["passes"]["two_stage"]["denoising"]], note=f"T = {eff['steps']}, one generated image")
record_claim(run, "ch5.t55_diversity", a=[diversity["w/ layout guidance (mine)"]], b=[diversity["w/o layout guidance"]],
             seeds=seeds, note=metric_note)
with_g, without_g = iou_by_arm["w/ layout guidance (mine)"], iou_by_arm["w/o layout guidance"]
both = [n for n in with_g if n in without_g]
if any(s06[n].any() for n in both):
    pick, where = {n: s06[n] for n in both}, "S_0.6 images"
else:
    pick, where = {n: np.ones_like(s06[n]) for n in both}, "S_0.6 empty for every model: all test images"
record_claim(run, "ch5.t55_segmentation", a=np.concatenate([with_g[n][pick[n]] for n in both]),
             b=np.concatenate([without_g[n][pick[n]] for n in both]), seeds=seeds, note=where)
record_claim(run, "ch5.s542_contrast_not_skin_tone", a=s06_shift["ITA Difference"].abs().fillna(0.0),
             b=s06_shift["ITA Skin"].abs().fillna(0.0), seeds=seeds,
             note="an empty S_0.6 counts as no shift (0)")

# %%
record = run.save()
print(run.stamp())
