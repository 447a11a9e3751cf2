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
# # Appendix: benchmarks
#
# How fast the book's methods are at small scale, and how much memory they would need at paper scale
# (issue 18). Every benchmark is a command, `ctrlgen bench <name> --profile P` (`ctrlgen bench all` runs them
# all), that writes a JSON report with the machine and library versions; speed is always a **ratio** of
# medians measured side by side in one run, because absolute seconds depend on the machine and its load.
# This page reads the reports of this build (`<output>/bench/`) and the reference runs committed with the
# code (`benchmarks/results/`), and says for each benchmark where it has been run — and where not.

# %% tags=["parameters"]
profile = "mini"
overrides = {}

# %% tags=["hide-input"]
import pandas as pd
from IPython.display import Markdown, display

from ctrlgen import paths
from ctrlgen.bench import growth_figure, load_reports, summary_rows
from ctrlgen.results import ChapterRun

# %% tags=["hide-input"]
run = ChapterRun.start("appx_benchmarks", profile, overrides)
cfg = run.cfg
built, committed = paths.output_root(cfg) / "bench", paths.project_root() / "benchmarks" / "results"
reports = load_reports(built, committed)
for r in reports:
    r["source"] = "this build" if r["source"] == str(built) else "committed reference run"

# %% [markdown]
# ## Which benchmark has run where
#
# One row per report; "not run" where no report exists. The targets are issue 18's.

# %%
summary = pd.DataFrame(summary_rows(reports)).set_index(["benchmark", "report"])
display(summary[["measures", "where", "model", "device", "machine", "when", "result"]])
gpu = [r for r in reports if str(r.get("device", "")).startswith("cuda")]
display(Markdown(
    f"**{len(reports)} report(s)** found; **{len(gpu)} ran on a GPU**. "
    + ("No benchmark has been run on a GPU: every number above is from a CPU, and the GPU memory and time of the "
       "paper-scale runs in the [GPU runbook](../book/gpu_runbook.md) are estimates, not measurements."
       if not gpu else "GPU reports: " + ", ".join(r["file"] for r in gpu) + ".")))
run.note(f"{len(reports)} benchmark reports read, {len(gpu)} on a GPU")
for number, count in summary.reset_index().groupby("benchmark")["report"].apply(lambda s: int((s != "").sum())).items():
    run.log_metric("appx.benchmarks", f"benchmark {number}", "reports", count)

# %% [markdown]
# ## Peak memory (benchmark 5)
#
# The memory each step needs above what the process held before it (`delta`, MiB), for the mini architecture
# and for the real SD 2.1-base U-Net with random weights (CPU, float32: a bfloat16 GPU run holds about half).
# The stored attention maps are checked against their stated bound (one layer-mean map per side and kind).

# %%
memory = [r for r in reports if r["file"].startswith("memory-")]
rows = {}
for r in memory:
    label = f"{r['model']} ({r['source']}, latent {r['latent']})"
    rows[label] = {k: (round(v["delta_mib"], 1) if "delta_mib" in v else "skipped") for k, v in r["modes"].items()}
    rows[label]["U-Net weights [MiB]"] = round(r["unet_weights_mib"], 1)
    for name, maps in r["stored_maps"].items():
        rows[label][f"stored maps, {name} [MiB] (bound)"] = (
            f"{maps['stored_bytes'] / 2**20:.2f} ({maps['bound_bytes'] / 2**20:.2f})")
if rows:
    display(pd.DataFrame(rows).T)
else:
    print("no memory report yet: run `ctrlgen bench memory`")
for r in memory:
    for mode, v in r["modes"].items():
        if "skipped" in v:
            print(f"{r['model']}: {mode} skipped — {v['skipped']}")

# %% [markdown]
# ## The book's wall time (benchmark 6)
#
# Per chapter, from the chapters' own records, and how a chapter's two main costs grow: lesion–mask pairs
# generated (in whole batches) and finetuning steps, each fitted by a line; `exponent_top` is the growth
# exponent between the two largest sizes above the fitted intercept (1: linear).

# %%
book = [r for r in reports if r["file"].startswith("book-")]
for r in book:
    times = pd.DataFrame({p: {c: (t or {}).get("wall_time_s") for c, t in chapters.items()}
                          for p, chapters in r["chapter_wall_time_s"].items()})
    display(Markdown(f"**{r['file']}** ({r['source']}, {r.get('written_at', '')}): "
                     "seconds per chapter (empty: not run on that profile)"))
    display(times)
    display(pd.DataFrame({k: g["fit"] for k, g in r["growth"].items()}).T)
    run.show(growth_figure(r), f"growth_{r['file'].removesuffix('.json')}_{r['source'].split()[0]}")
if not book:
    print("no book report yet: run `ctrlgen bench book`")

# %%
run.save()
print(run.stamp())
