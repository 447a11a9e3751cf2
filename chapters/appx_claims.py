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
# # Appendix: the claims ledger
#
# Which of the thesis's claims did this run reproduce, which not, and how sure is it? Every directional
# claim that a table, an ablation or a figure of chapters 2–6 supports is listed below, worded as the thesis
# states it — exceptions included — with the thesis's own evidence (verbatim quotes and table cells). Each
# chapter, when it runs, records the measurement behind each of its claims in its result record; this page
# reads every record of the profile and applies the verdict rules below. Nothing on this page is written by
# hand: the verdicts are computed, and a claim whose experiment did not run says "not run" and why.

# %% tags=["parameters"]
profile = "mini"
overrides = {}

# %%
import html

import pandas as pd
from IPython.display import HTML, Markdown, display

from ctrlgen import load_profile
from ctrlgen.book import toc_chapters
from ctrlgen.results import ChapterRun
from ctrlgen.thesis.claims import (ALPHA, MEASURES, N_RESAMPLES, check_records, claim_seeds, ledger_table,
                                   load_ledger, load_records)

cfg = load_profile(profile, overrides)
run = ChapterRun("appx_claims", cfg)
records = {name: rec for name, rec in load_records(cfg.profile_name, cfg).items() if name != "appx_claims"}
print(f"profile {cfg.profile_name}: {len(records)} chapter records found ({', '.join(records) or 'none'}); "
      f"training seeds per claim (claims.seeds): {claim_seeds(cfg)}")

# %% [markdown]
# ## The verdict rules
#
# For each claim the ledger names the arm the claim favours (*a*), the arm or arms it is compared with
# (*b*), the direction, and the kind of measurement that can test it. The effect is the mean difference
# *a − b*, signed so that a positive value is the direction the thesis claims (the relative gain
# (*a − b*)/|*b*| is shown too where the thesis quotes percentages).

# %%
display(Markdown(f"""
* **not run** — no result record of this run holds a measurement for the claim; the reason names the
  chapter that should record it, or says that chapter's record lacks it.
* **exact counts** (costs such as denoising steps) — reproduced when the count goes the claimed way (and
  within the ratio the claim states), not reproduced when it does not, inconclusive on a tie.
* **one unit per arm** (e.g. one training seed for a per-seed claim) — inconclusive: no interval or test is
  possible; the reason gives the direction observed.
* otherwise a percentile bootstrap interval of the mean difference (`scipy.stats.bootstrap`,
  {N_RESAMPLES} resamples, seeded per claim; pairs resampled together when the design is paired) at level
  1 − α/k, and a two-sided test — Wilcoxon signed-rank for paired samples, Mann–Whitney U for unpaired
  samples, paired t-test for per-seed values — with α = {ALPHA} split over the k arms the claim compares
  against (Bonferroni):
  **reproduced** when for every arm the signed interval lies above 0 and p < α/k;
  **not reproduced** when for some arm it lies below 0 and p < α/k (the run goes the other way);
  **inconclusive** otherwise (the interval includes 0, or the test does not reach α/k).
* a claim about trained models measured on **one training seed** keeps its verdict but says so: its
  interval covers the variation of test samples, not that of training (profile key `claims.seeds`).

Kinds of measurement: {"; ".join(f"*{k}* — {v}" for k, v in MEASURES.items())}.
"""))

# %% [markdown]
# ## Summary

# %%
ledger = ledger_table(records)
summary = pd.crosstab(ledger["chapter"], ledger["verdict"], margins=True, margins_name="all")
summary = summary.reindex(columns=[c for c in ("reproduced", "not reproduced", "inconclusive", "not run", "all")
                                   if c in summary.columns])
for verdict, count in ledger["verdict"].value_counts().items():
    run.log_metric("appx.claims", "verdicts", verdict, int(count))
summary

# %% [markdown]
# ## Every claim
#
# Each row: the claim as the thesis states it (what this book measures when narrower, in brackets), the
# thesis's evidence, this run's evidence, the verdict with its reason, and the chapter that records it.

# %%
pages = set(toc_chapters())
COLOURS = {"reproduced": "#1b7f3b", "not reproduced": "#b3261e", "inconclusive": "#8a6d00", "not run": "#666"}


def chapter_link(chapter: str, section: str) -> str:
    """A link to the chapter page when it is in this book, else the chapter name as text."""
    name = html.escape(chapter)
    matches = [p for p in pages if p == chapter or p.startswith(chapter + "_")]
    return f'<a href="{matches[0]}.html">{name}</a> {html.escape(section)}' if matches else f"{name} {html.escape(section)}"


def ledger_html(frame: pd.DataFrame) -> str:
    """The ledger as an HTML table; every text cell is escaped (claims quote tokens such as <lesion>)."""
    head = ["claim", "thesis evidence", "this run", "verdict", "chapter"]
    rows = []
    for cid, r in frame.iterrows():
        claim = (f"<b>{html.escape(r['reference'])}</b> ({html.escape(r['section'])}) · <code>{html.escape(cid)}</code>"
                 f"<br>{html.escape(r['claim'])}<br><small>{html.escape(r['measurement'])}</small>")
        verdict = (f'<b style="color:{COLOURS[r["verdict"]]}">{html.escape(r["verdict"])}</b>'
                   f"<br><small>{html.escape(r['reason'])}</small>")
        cells = [claim, f"<small>{html.escape(r['thesis evidence'])}</small>", f"<small>{html.escape(r['this run'])}</small>",
                 verdict, chapter_link(r["registered by"], r["section"])]
        rows.append("<tr>" + "".join(f'<td style="vertical-align:top;text-align:left">{c}</td>' for c in cells) + "</tr>")
    header = "".join(f'<th style="text-align:left">{h}</th>' for h in head)
    return f'<table class="dataframe"><thead><tr>{header}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


for chapter, part in ledger.groupby("chapter", sort=True):
    display(Markdown(f"### Chapter {chapter}"))
    display(HTML(ledger_html(part)))

# %% [markdown]
# ## Integrity of the records
#
# Every chapter that ran must have recorded each claim it registers; a chapter listed here ran without
# recording some of its claims (they read "not run" above, with that reason).

# %%
problems = check_records(load_ledger(), records)
for chapter, missing in problems.items():
    run.log_metric("appx.claims", "missing from record", chapter, len(missing))
print("every chapter that ran recorded all of its claims" if not problems else
      "\n".join(f"{chapter}: {', '.join(ids)}" for chapter, ids in problems.items()))

# %%
run.log_table("appx.claims.verdicts", ledger[["verdict", "reason"]])
run.save()
print(run.stamp())
