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
# # Appendix: the data
#
# Every chapter reads its data through `ctrlgen.data.load_dataset`: the real dataset when the data
# root holds it in its official layout, otherwise a procedural world the book generates and writes in
# the *same* layout, so the same readers run. This page tours whatever data this run has, and says
# for each dataset which of the two it is.

# %% tags=["parameters"]
profile = "mini"
overrides = {}

# %% tags=["hide-input"]
import pandas as pd

from ctrlgen import figures
from ctrlgen.data import chexpert_label_table, load_dataset, load_multiconcept
from ctrlgen.data.attributes import dataset_ita_changes, summarize_ita_changes
from ctrlgen.data.check import check_all, format_report
from ctrlgen.data.figures import (class_distribution, dataset_attributes, derm_controls_figure, label_cooccurrence,
                                  plot_attributes, plot_cooccurrence, plot_ita_changes, show_samples)
from ctrlgen.results import ChapterRun

# %% tags=["hide-input"]
run = ChapterRun.start("appx_data", profile, overrides)
cfg = run.cfg

# %% [markdown]
# ## What the data root holds
# `ctrlgen data check` lists every dataset as found, partial or missing, with where to obtain it.

# %%
statuses = check_all(cfg)
print(format_report(statuses))

# %% [markdown]
# ## ISIC 2018 Task 1: lesion images and masks (thesis §4.4.1)

# %%
task1 = load_dataset("isic2018_task1", cfg)
print(task1, "\n", task1.provenance)
run.note(f"isic2018_task1: {task1.provenance}")
run.show(show_samples(task1, 8), "isic2018_task1_samples")

# %% [markdown]
# ## Lesion attributes (thesis §5.3.2)
# ITA of skin and lesion (Eq. 5.1), their difference (lesion–skin contrast), area ratio and circularity
# (Eq. 5.2). Chapter 5 calls the images with ITA Difference < 30 the low-contrast subset.

# %%
attributes = dataset_attributes(task1)
threshold = cfg.data.attributes.low_contrast_threshold
print(attributes.describe().round(2).to_string())
low_contrast = int((attributes.ita_difference < threshold).sum())
print(f"low-contrast (ITA difference < {threshold}): {low_contrast} of {len(attributes)}")
run.log_table("appx.isic2018_task1.attributes", attributes.describe().loc[["mean", "std", "min", "max"]].T)
run.log_metric("appx.isic2018_task1.attributes", "low-contrast subset", "count", low_contrast)
run.log_metric("appx.isic2018_task1.attributes", "low-contrast subset", "of", len(attributes))
run.show(plot_attributes(attributes, f"ISIC 2018 Task 1 ({task1.source})"), "isic2018_task1_attributes")

# %% [markdown]
# ### Which angle: atan2, not the plain arctangent
# Eq. (5.1) printed as arctan((L* − 50)/b*) gives the wrong sign when a region's mean b* is negative
# (a bluish cast): light skin (L* > 50) comes out at a negative angle, Fitzpatrick VI, "dark skin", and
# its ITA difference turns negative, so a high-contrast lesion joins the low-contrast subset. The book
# uses the quadrant-aware angle atan2(L* − 50, b*), which agrees with Eq. (5.1) for every b* > 0 and
# puts light bluish skin above 90° (the lightest group). Below: what the choice changes on this data,
# counted by this run, and the ITA distributions under both.

# %%
changes = dataset_ita_changes(task1.with_images(), threshold)
ita_summary = summarize_ita_changes(changes)
run.log_table("appx.isic2018_task1.ita_formula", ita_summary)
print(ita_summary.to_string(float_format="{:.3f}".format))
run.show(plot_ita_changes(changes), "isic2018_task1_ita_formulas")

# %% [markdown]
# ## HAM10000 / ISIC 2018 Task 3: diagnoses
# The thesis notes that HAM10000 is dominated by melanocytic nevi (NV); the share this run's data
# holds is measured here.

# %%
ham = load_dataset("ham10000", cfg, resolution=0)
print(ham.provenance)
classes = class_distribution(ham)
run.log_table("appx.ham10000.classes", classes)
classes

# %% [markdown]
# ## Chest X-rays: CheXpert label co-occurrence and the MIMIC-CXR-JPG world (chapter 6)

# %%
labels = chexpert_label_table(cfg)
mimic = load_dataset("mimic_cxr", cfg)
print(mimic.provenance)
if labels is None:
    labels = pd.DataFrame([r.labels for r in mimic])
run.show(plot_cooccurrence(label_cooccurrence(labels), "P(column positive | row positive)"), "cxr_label_cooccurrence")

# %%
run.note(f"mimic_cxr: {mimic.provenance}")
run.show(figures.image_grid([r.load_image("L") for r in mimic[:6]], [r.split for r in mimic[:6]], mimic.source,
                            cmap="gray"), "mimic_cxr_samples")
print(mimic[0].text)

# %% [markdown]
# ## The procedural worlds and their controls
# Dermoscopy scenes, one control swept per row (contrast, skin tone, size, border irregularity, hair):

# %%
run.show(derm_controls_figure(cfg.seed, cfg.data.resolution), "derm_world_controls")

# %% [markdown]
# Multi-concept scenes for chapter 3: captioned pretraining scenes, and customization images holding
# two novel instances.

# %%
scenes = load_multiconcept(cfg)
shown = scenes.split("pretrain")[:3] + scenes.split("customize")[:3]
run.show(figures.image_grid([r.load_image() for r in shown], [r.text[12:40] for r in shown], "multi-concept world"),
         "multiconcept_world")

# %% [markdown]
# ## Licences and attributions
# ISIC 2018 (CC BY-NC 4.0; Codella et al. 2019, Tschandl et al. 2018), HAM10000 (CC BY-NC-SA 4.0;
# Tschandl et al. 2018, 2020), PH2 (Mendonça et al. 2013), Derm7pt (Kawahara et al. 2018),
# Fitzpatrick17k (CC BY-NC-SA 3.0; Groh et al. 2021), DDI (Daneshjou et al. 2022), DermaMNIST
# (Yang et al. 2023), NIH ChestX-ray14 (Wang et al. 2017), IU X-ray (Demner-Fushman et al. 2016;
# R2Gen split, Chen et al. 2020), CheXpert (Irvin et al. 2019), MIMIC-CXR (Johnson et al. 2019).
# See `data/README.md` for where each comes from.

# %%
status_table = pd.DataFrame([{"dataset": s.name, "status": s.status, "records": s.records} for s in statuses]).set_index("dataset")
run.log_table("appx.data_check", status_table)
run.save()
print(run.stamp())
