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
# # Chapter 6 — CXR-IRGen: chest X-ray image–report pairs from labels
#
# Thesis chapter 6 generates a chest X-ray *and* its report from a label. The **vision module** (§6.3.1) turns
# the label into a semi-structured prompt ("A chest X-Ray image with …, without …, and unclear about …"), picks
# a reference image with the same label, and conditions a latent diffusion model on the prompt's text embedding
# combined with the reference image's embedding (Eq. 6.1: concatenated for the U-Net, averaged for the U-ViT).
# The **language module** (§6.3.2) is a BART trained to rebuild a report from one representative embedding of it
# (Eq. 6.2) and a prior that maps the image's latent to that embedding (L_prior, Eq. 6.3); the BART decoder then
# writes the report.
#
# This chapter trains and evaluates both modules (Tables 6.1–6.5, Fig. 6.5) at the profile's scale, with a
# CheXpert-style labeler for the clinical F1 and compact R2Gen, M²Trans and CXR-RePaiR baselines trained here on
# the same pairs. Every number below is computed by this run; the thesis's numbers appear only in columns
# labelled "thesis".

# %% tags=["parameters"]
profile = "mini"
overrides = {}

# %% tags=["hide-input"]
import numpy as np
import pandas as pd
import torch

from ctrlgen import figures
from ctrlgen.experiments import ch06_cxr_irgen as ch06
from ctrlgen.methods.cxr_irgen import label_prompt
from ctrlgen.metrics.image import metric_extractors
from ctrlgen.results import ChapterRun
from ctrlgen.thesis import compare
from ctrlgen.thesis.claims import claim_seeds, record_claim

# %% tags=["hide-input"]
run = ChapterRun.start("ch06_cxr_irgen", profile, overrides)
cfg = run.cfg
ec = ch06.Ch06Config.from_profile(cfg)
print(f"profile {cfg.profile_name}: vision runs of {ec.short_steps} ('5k') and {ec.long_steps} ('10k') steps, "
      f"{ec.n_table_6_1} images per Table 6.1 row, {ec.n_per_label} per label in Table 6.2; "
      f"BART stage 1 {ec.stage1_steps} steps, prior {ec.prior_steps} steps")

# %% [markdown]
# ## Data, labels and prompts
#
# The vision module is trained on the book's `cxr` domain — the data chapter 2's base model was pretrained on:
# real NIH ChestX-ray14 images when the data root holds them, else the procedural MIMIC-CXR world (the thesis:
# MIMIC-CXR's PA images). NIH's 14 findings are mapped to CheXpert's observations (`ch06.NIH_TO_CHEXPERT`:
# Effusion → Pleural Effusion, Mass and Nodule → Lung Lesion, Pleural_Thickening → Pleural Other; Infiltration,
# Emphysema, Fibrosis and Hernia have no observation). NIH lists the findings it found and negates nothing, so
# on NIH an unlisted observation is *blank*, "No Finding" is 1.0 when nothing is listed, there is no Lung
# Opacity, and neither the "without" nor the "unclear about" clause ever appears (both do on the world's
# CheXpert-style labels). Empty clauses are left out of the prompt (the book's choice).

# %%
base, sets = ch06.load_base_and_sets(cfg)
print(f"vision data: {len(sets.train_images)} training + {len(sets.test_images)} held-out images of {sets.dataset}; "
      f"{sets.provenance}")
run.note(f"vision module data: {sets.dataset} ({sets.provenance}); {len(sets.train_images)} training, "
         f"{len(sets.test_images)} held-out images")
for name, count in sets.counts.items():
    run.log_metric("ch06.data", "vision labels", name, count)
print("label handling:", sets.counts)
print("example prompts:", *sorted(set(sets.train_prompts))[:5], sep="\n  ")
lengths = ch06.prompt_lengths(base, sets.train_prompts)
for name, count in lengths.items():
    run.log_metric("ch06.data", "training prompts", name, count)
print("prompt tokens:", lengths)
ch06.label_summary(sets)

# %% [markdown]
# **Reference images (§6.3.1).** For each training image, a reference is drawn from the training pool with the
# same label, else with the same positive observations; an image is never its own reference (the book's choice
# against leakage), and a label with neither gets no reference (a zero image embedding — the unconditional one).
# The reference is encoded once: on `full` by CLIP's image encoder, on `mini`/`smoke` by the frozen domain VAE
# through a fixed random projection to the text width (`ch06.vision.image_encoder`); it is rescaled to the norm of
# a text token. For the U-Net it is appended to the prompt's tokens as one extra token; for the U-ViT it is
# averaged into every token (Eq. 6.1). The unconditional branch of classifier-free guidance is the empty prompt
# with a zero image embedding; a training condition is dropped to it with probability
# `ch06.vision.dropout_probability` (the book's choice: the thesis does not say).

# %%
ctx = ch06.vision_context(cfg, base, sets, ec)
for name, count in ch06.reference_counts(ctx).items():
    run.log_metric("ch06.data", "reference selection", name, count)
ch06.reference_counts(ctx)

# %% [markdown]
# **Training, two at a time.** The chapter's models come in two waves of jobs that do not wait on each other:
# first the vision variants, the stage-1 BARTs, the Table 6.2 classifier and the report baselines, then the priors
# (they need stage 1) and the Table 6.1 / 6.2 images (they need the vision variants). This cell trains both waves,
# `jobs` at a time (`ctrlgen.parallel`: one thread per job, so the numbers do not depend on the machine's cores),
# and returns the vision and language models; the sections below use them and read the rest (the Table 6.2
# classifier, the generated images) from the cache, in the thesis's order.

# %%
rs = ch06.report_sets(cfg)
cc = ch06.ClinicalConfig.from_profile(cfg)   # the clinical section's settings (its baselines train in wave 1)
vm, language = ch06.train_all(cfg, ctx, rs, cc)

# %% [markdown]
# ## Finetuning the vision module
#
# Four variants per backbone: with and without the reference image embedding (RIE), each at two lengths — the
# thesis's 5k and 10k steps, here `ch06.vision.short_steps` and `long_steps` (the long run continues the short
# one; rows keep the thesis's names "5k"/"10k"). The U-Net starts from the `cxr` base model (SD 1.4 on `full`);
# the U-ViT (Bao et al. 2023: transformer blocks with long skip connections) is trained from scratch on `mini`
# (pretrained U-ViT weights from `ch06.vision.uvit.weights` on `full`). Text and image encoders stay frozen. Every
# trained backbone is stored by content.

# %%
run.show(ch06.loss_figure(vm, ec), "vision_losses")

# %% [markdown]
# ## General image quality — Table 6.1 (§6.4.3)
#
# Each model generates one image per held-out label (the thesis: 1000 test labels). FID compares the generated
# set with the real held-out images (chapter 4's extractor: Inception on `full`, the domain VAE's encoder on
# `mini` — values not comparable with the thesis's); PSNR and SSIM compare image *i* with the real image whose
# label generated it (the book's pairing; the thesis does not say). "Vanilla LDM" is the base model with the new
# prompts and no finetuning — on `mini` it was pretrained on the same images with simpler captions, so unlike the
# thesis's SD 1.4 it is no stranger to chest X-rays.

# %%
fid_features, _, metric_note = metric_extractors(cfg, vae=base.vae)
run.note(f"Table 6.1 metrics: {metric_note}")
t61 = ch06.table_6_1(cfg, ctx, vm, fid_features)
run.log_table("6.1", t61.table)
compare("6.1", t61.table, cfg.profile_name)

# %% [markdown]
# What the reference image embedding changes, per backbone and length (with RIE minus without; the thesis's §7.2
# reads its U-ViT rows as a limitation of averaging: better FID, lower PSNR and SSIM):

# %%
effect = ch06.rie_effect(t61.table)
run.log_table("ch06.rie_effect", effect.xs("this run", axis=1, level=1))
effect

# %%
run.show(figures.image_grid_figure({**{k: v for k, v in list(t61.samples.items())[:5]}, "real (held-out)": t61.real},
                                   n=ec.n_figure, title="Samples for the same held-out labels"), "table_6_1_samples")

# %% [markdown]
# ## Clinical efficacy — Table 6.2 (§6.4.3)
#
# Each pathology's label ("A chest X-Ray image with cardiomegaly") and "No Finding" generate `n_per_label` images
# each (the thesis: 500); a classifier scores each image for the pathology and the AUROC separates the pathology's
# images from the No Finding images. The thesis uses the torchxrayvision DenseNet-121; here a small CNN trained on
# the real training images' findings (`ctrlgen.analysis.quality_bar`) — on every profile, since the DenseNet is not
# wired in this part. "Original" applies it to the real held-out images (the thesis: training images; here the
# classifier was trained on those). A pathology the data does not have
# (Lung Opacity on NIH) reads "–". U-Net backbone only, as in the thesis.

# %%
classifier = ch06.pathology_classifier(cfg, sets, ec)
print("held-out images per pathology (Original row):", ch06.real_pathology_counts(sets))
t62 = ch06.table_6_2(cfg, ctx, vm, classifier)
run.log_table("6.2", t62)
compare("6.2", t62, cfg.profile_name)

# %% [markdown]
# ## The language module (§6.3.2)
#
# **Stage 1** trains a BART (bart-base from `ch06.language.bart` on `full`; a small BART config from scratch on
# `mini`, the book's size) to rebuild each report from the mean of its encoder token states; encoder and decoder
# both train. Reports are cleaned as R2Gen cleans IU X-ray reports. F trains on findings; F+I on findings followed
# by the impression. The corpus is the real IU X-ray findings (R2Gen's split; they have no impression, so F+I adds
# only the world's) and the CXR world's reports; empty reports and reports of only "XXXX" de-identification
# tokens are dropped and counted. **Stage 2** trains the prior on the world's true image–report pairs: its input is
# the image's latent (the frozen VAE's encoding of a real image; a generated image's z_0), its target the
# frozen stage-1 embedding of the report, its loss L_prior = MSE + λ(1 − cos) with λ = 0.01, the cosine a true cosine.

# %%
print(f"stage 1: {len(rs.stage1_f)} F / {len(rs.stage1_fi)} F+I reports; IU X-ray: {rs.iu_source}")
print(f"stage 2: {len(rs.pair_f_train)} training / {len(rs.pair_f_test)} test image–report pairs ({rs.world_source})")
for name, count in rs.counts.items():
    run.log_metric("ch06.data", "reports", name, count)
run.note(f"language module: IU X-ray {rs.iu_source}; pairs from {rs.world_source}")
rs.counts

# %%
s1, s1_fi, priors = language.stage1, language.stage1_fi, language.priors

# %% [markdown]
# ### Representative embedding — Fig. 6.5 (§6.5.1)
#
# BLEU and ROUGE-L of held-out IU X-ray findings rebuilt from the [BOS] token's state, the [EOS] token's state and
# the mean over tokens, during stage-1 training (three BARTs trained alike). Metrics are pycocoevalcap's, as
# R2Gen computes them (`ctrlgen.metrics.report`; sacrebleu and rouge-score agree where their definitions do — see
# that module).

# %%
curves = {how: s.curve for how, s in s1.items()}
run.show(ch06.fig_6_5(curves), "fig_6_5_representative_embedding")
final = pd.DataFrame({how: c.iloc[-1] for how, c in curves.items()}).T
run.log_table("ch06.fig_6_5_final", final)
final

# %% [markdown]
# ### Reports for real images — Table 6.3 (language rows) and Table 6.5 (§6.4.4, §6.5.2–6.5.3)
#
# Each test image of the world's pairs goes through the prior and the decoder; the report is scored against the
# image's own report (findings for F and the ablations, findings + impression for F+I — the thesis scores BLEU and
# ROUGE-L on F only). The F1 column labels the generated report and the test image's whole reference report
# (findings + impression) with the CheXpert-style labeler below and takes the micro F1 over the 14 observations.

# %% [markdown]
# ### The CheXpert-style labeler (§6.4.2)
#
# The thesis's clinical F1 applies the CheXpert labeler (Irvin et al. 2019) to the generated and the original
# reports. `ctrlgen.metrics.chexpert_labeler` follows it: the labeler's own mention and unmention phrase lists
# (shipped under their MIT licence), its cleaning, and its aggregation rules (several mentions of an observation,
# "No Finding", "chf"). Its negation and uncertainty step is the one difference: CheXpert matches NegBio's
# dependency-graph patterns on a parse, which needs a parser this book does not ship, so the book translates
# those patterns' cases into NegEx-style cue phrases with a scope, in CheXpert's order (pre-negation
# uncertainty, negation, post-negation uncertainty). Labels are 1 / 0 / −1 / blank. **F1** (the book's reading of
# the R2Gen family's clinical-efficacy metric): micro precision, recall and F1 over the 14 observations, an
# observation present when its label is 1 — uncertain, negative and blank count as absent
# (`ch06.clinical.uncertain`). The labeler is measured here on the CheXpert labeler's own labelled sample reports
# (exact), on IU X-ray's "Problems" annotations mapped to observations (`ch06.IU_PROBLEMS`; they list what is
# present, so only precision / recall / F1 of "present"), and on the world's reports against their true labels
# (the world writes "The lungs are clear." for a negative Lung Opacity, which has no CheXpert mention: blank, as
# the real labeler gives, so its exact agreement there is below 1 by design).

# %%
validation = ch06.labeler_validation(cfg, cc)
for line in validation["notes"]:
    print(line)
for name in ("golden", "iu", "world"):
    if name in validation:
        run.log_table(f"ch06.labeler_{name}", validation[name])
if "golden" in validation:
    display(validation["golden"])  # noqa: F821
if "iu" in validation:
    display(validation["iu"].round(3))  # noqa: F821
validation["world"].round(3)

# %% [markdown]
# ### Baselines (§6.4.2)
#
# The thesis reruns R2Gen and M²Trans from their public code and checkpoints and cites CXR-RePaiR's numbers. No
# checkpoint exists here, so compact versions are trained on the same training pairs as CXR-IRGen's prior, reading
# the same image embedding (the image's latent): **R2Gen** (`methods.baselines.r2gen`: relational memory and
# memory-driven conditional layer norm in a transformer decoder), **M²Trans** (`methods.baselines.m2trans`: the
# meshed-memory transformer, trained with cross-entropy only — Miura et al.'s reinforcement-learning rewards and
# CheXpert-trained image encoder are not reproduced) and **CXR-RePaiR** (`methods.baselines.cxr_repair`: a small
# CLIP trained contrastively on the pairs, the most similar training report retrieved; a row of this book beside
# the thesis's CXR-RePaiR-ℒ* and -Select* rows, which are **not run**: the thesis cites them from Endo et al.'s
# paper, and they need that paper's MIMIC-CXR CLIP and its sentence corpus — their "this run" cells read "–").
# Sizes and steps: `ch06.baselines` (the book's). Every baseline is stored by content.

# %%
baselines = language.baselines   # trained in wave 1 (ch06.train_all)
test_inputs = ch06.prior_inputs(base, rs.pair_images_test, raw=False)
hyps = {name: ch06.reports_for(ec, s1_fi if name == "F+I" else s1["mean"], pr, base, images=rs.pair_images_test)
        for name, pr in priors.items()}
hyps.update({name: b.write(test_inputs) for name, b in baselines.items()})
refs = {name: rs.pair_fi_test if name == "F+I" else rs.pair_f_test for name in hyps}
ref_labels = ch06.reference_labels(rs.pair_fi_test)
rows63 = {**{row: name for name, row in ch06.BASELINE_ROWS.items()},
          ("Proposed approach", "CXR-IRGen (F)"): "F", ("Proposed approach", "CXR-IRGen (F+I)"): "F+I"}
t63 = ch06.frame({row: ch06.report_row(hyps[name], refs[name], ref_labels, "F1 score ↑", " ↑", cc.uncertain)
                  for row, name in rows63.items()})
run.note(f"Table 6.3: {len(rs.pair_f_test)} test image–report pairs of {rs.world_source}")
run.log_table("6.3", t63)
compare("6.3", t63, cfg.profile_name)

# %%
rows65 = {("Proposed approach", "CXR-IRGen (F)"): "F", ("Change input", "Input image"): "raw image",
          ("Change loss function", "Mean square error"): "MSE only", ("Change loss function", "Cosine similarity"): "cosine only"}
t65 = ch06.frame({row: ch06.report_row(hyps[name], refs[name], ref_labels, uncertain=cc.uncertain)
                  for row, name in rows65.items()})
run.log_table("6.5", t65)
compare("6.5", t65, cfg.profile_name)

# %% [markdown]
# ### Clinical efficacy on generated images — Table 6.4 (§6.4.4)
#
# Table 6.2's generated images (`n_per_label` per pathology and No Finding, each U-Net variant; the thesis: the
# same 3000 images) go through every report generator via their z_0; the F1 compares each report's labels with
# the label its image was generated from (the book's reading: the thesis does not name the reference). On `mini`
# with the NIH data the vision module learned NIH images while the report generators learned the world's pairs.

# %%
R2GEN, M2, IRGEN_F, IRGEN_FI = (ch06.BASELINE_ROWS["R2Gen"], ch06.BASELINE_ROWS["M²Trans"],
                                ("Proposed approach", "CXR-IRGen (F)"), ("Proposed approach", "CXR-IRGen (F+I)"))
f1_inputs = {R2GEN: baselines["R2Gen"].write, M2: baselines["M²Trans"].write,
             IRGEN_F: lambda z: ch06.reports_for(ec, s1["mean"], priors["F"], base, latents=z),
             IRGEN_FI: lambda z: ch06.reports_for(ec, s1_fi, priors["F+I"], base, latents=z)}
t64, f1_generated = ch06.table_6_4(cfg, ctx, vm, f1_inputs, cc.uncertain)
run.log_table("6.4", t64)
compare("6.4", t64, cfg.profile_name)

# %%
pd.DataFrame({"generated (F)": hyps["F"][:3], "generated (F+I)": hyps["F+I"][:3], "true findings": rs.pair_f_test[:3]})

# %% [markdown]
# ## Image–report pairs from labels (§6.3, Fig. 6.2)
#
# The whole pipeline: label → prompt and reference → image from the U-Net with RIE (the long run) → its z_0 →
# prior (F+I) → report. On `mini` with the NIH data the vision module learned NIH images while the prior learned
# the world's pairs, so these reports read the NIH-like latents through a prior fitted to another image source.

# %%
labels = [{"Cardiomegaly": 1.0}, {"Pleural Effusion": 1.0}, {"No Finding": 1.0}, {"Atelectasis": 1.0, "Edema": 0.0}]
labels = labels[:max(1, ec.n_figure)]
key = ("unet", True, "long")
pairs = ch06.cached_generation(cfg, ctx, "pairs figure", vm.models[key], vm.keys[key], labels, "unet", True, ec.seed + 7)
pair_reports = ch06.reports_for(ec, s1_fi, priors["F+I"], base, latents=pairs["latents"])
run.show(ch06.pairs_figure(pairs["images"], pair_reports, [label_prompt(l) for l in labels]), "image_report_pairs")

# %% [markdown]
# ## The claims of this chapter
#
# Each measurable claim gets its values recorded for the claims ledger (back matter). Table 6.1's claims compare
# trained models (one value per training seed); Table 6.2's compare per pathology; Table 6.5's and Fig. 6.5's per
# report (paired by test report); Tables 6.3–6.4's clinical F1 per report (paired by test or generated image).

# %%
seeds = claim_seeds(cfg)
t = t61.table
unet = lambda rie, length: t.loc[ch06.row_name(ec, "unet", rie, length)]  # noqa: E731
record_claim(run, "ch6.t61_finetuning", a=[unet(False, "short")["FID↓"]], b=[t.loc[("Baseline", "Vanilla LDM")]["FID↓"]], seeds=seeds)
record_claim(run, "ch6.t61_5k_vs_10k", a=[unet(False, "short")["FID↓"]], b=[unet(False, "long")["FID↓"]], seeds=seeds)
record_claim(run, "ch6.t61_rie_fid", a=[unet(True, "short")["FID↓"]], b=[unet(False, "short")["FID↓"]], seeds=seeds)
cols = list(ch06.TABLE_6_2.values())
finite = [c for c in cols if t62[c].drop(index=("Baseline", "Original")).notna().all()]  # pathologies the classifier knows
rie = [t62.loc[ch06.row_name(ec, "unet", True, L, "6.2"), c] for L in ("short", "long") for c in finite]
norie = [t62.loc[ch06.row_name(ec, "unet", False, L, "6.2"), c] for L in ("short", "long") for c in finite]
record_claim(run, "ch6.t62_rie_auroc", a=rie, b=norie, seeds=seeds)
record_claim(run, "ch6.t62_finetuning_auroc", a=[t62.loc[ch06.row_name(ec, "unet", False, "short", "6.2"), c] for c in finite],
             b=[t62.loc[("Baseline", "Vanilla LDM"), c] for c in finite], seeds=seeds)
bleu1 = {name: ch06.per_report_scores(hyps[name], refs[name])["BLEU-1"] for name in ("F", "raw image", "MSE only", "cosine only")}
record_claim(run, "ch6.t65_embedding_input", a=bleu1["F"], b=bleu1["raw image"], seeds=seeds)
record_claim(run, "ch6.t65_prior_loss", a=bleu1["F"], b={"MSE only": bleu1["MSE only"], "cosine only": bleu1["cosine only"]},
             seeds=seeds)
eval_texts = rs.eval_iu[:ec.n_eval_reports]
recon = {how: ch06.reconstruction_scores(ec, s, eval_texts)["ROUGE-L"] for how, s in s1.items()}
record_claim(run, "ch6.fig65_mean_embedding", a=recon["mean"], b={"[BOS]": recon["bos"], "[EOS]": recon["eos"]}, seeds=seeds)
f1 = {name: ch06.per_report_f1(ch06.label_reports(hyps[name]), ref_labels, cc.uncertain)
      for name in ("F", "F+I", "R2Gen", "M²Trans")}
record_claim(run, "ch6.t63_f1", a=f1["F+I"], b={"R2Gen": f1["R2Gen"], "M²Trans": f1["M²Trans"], "CXR-IRGen (F)": f1["F"]},
             seeds=seeds)
columns = list(t64.columns)
gen_f1 = lambda row: np.concatenate([f1_generated[(row, c)] for c in columns])  # noqa: E731
record_claim(run, "ch6.t64_f1_generated", a=gen_f1(IRGEN_FI), b={"R2Gen": gen_f1(R2GEN), "M²Trans": gen_f1(M2)}, seeds=seeds)
rie_rows = [M2, IRGEN_F, IRGEN_FI]
with_rie = [ch06.row_name(ec, "unet", True, L)[1] for L in ("short", "long")]
without_rie = [ch06.row_name(ec, "unet", False, L)[1] for L in ("short", "long")]
_ = record_claim(run, "ch6.t64_rie_f1", a=np.concatenate([f1_generated[(r, c)] for r in rie_rows for c in with_rie]),
                 b=np.concatenate([f1_generated[(r, c)] for r in rie_rows for c in without_rie]), seeds=seeds)

# %%
record = run.save()
print(run.stamp())
