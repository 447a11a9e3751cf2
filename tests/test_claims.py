"""The claims ledger: facts checked against the thesis text, the recording API, and the verdict rules in
every branch on hand-made data, with the statistics checked against scipy and closed forms."""
from __future__ import annotations

import ast
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from ctrlgen.thesis import load_table, table_ids
from ctrlgen.thesis.claims import (ALPHA, MEASURES, RECORD_TABLE, Claim, bootstrap_ci, check_records, claim_seeds,
                                   evaluate, get_claim, ledger_table, load_ledger, record_claim, two_sided_test,
                                   verdicts)


# ---------------------------------------------------------------- the ledger against the thesis
def test_ledger_size_and_ids_are_unique():
    ledger = load_ledger()
    assert 25 <= len(ledger) <= 60
    assert len({c.id for c in ledger}) == len(ledger)
    assert {c.chapter for c in ledger} >= {3, 4, 5, 6}


def test_every_quote_occurs_verbatim_in_the_thesis(thesis_text):
    flat = " ".join(thesis_text.split())
    for claim in load_ledger():
        assert claim.quotes, claim.id
        for quote in claim.quotes:
            assert quote in flat, f"{claim.id}: quote not in the thesis: {quote[:70]}"


def test_every_reference_names_an_existing_table_figure_equation_and_section(thesis_text):
    for claim in load_ledger():
        assert re.search(rf"\n{re.escape(claim.section)}\s+[A-Z]", thesis_text), f"{claim.id}: no section {claim.section}"
        refs = re.findall(r"(Table|Fig\.|Eq\.) \(?(\d\.\d+)", claim.ref)
        assert refs or claim.ref == f"§{claim.section}", claim.id
        for kind, number in refs:
            if kind == "Table":
                assert number in table_ids() and f"Table {number}:" in thesis_text, f"{claim.id}: Table {number}"
            elif kind == "Fig.":
                assert f"Figure {number}:" in thesis_text, f"{claim.id}: Figure {number}"
            else:
                assert f"({number})" in thesis_text, f"{claim.id}: Eq. ({number})"


def test_cells_resolve_to_the_transcribed_tables_and_match_the_claimed_direction():
    """Where a claim lists the favoured arm's cell first and a compared arm second, the thesis's own numbers
    go the claimed way — except where the claim itself states the exception (e.g. Table 4.2, VGG16)."""
    for claim in load_ledger():
        values = [cell.value() for cell in claim.cells]
        assert all(isinstance(v, float) for v in values), claim.id
    c = get_claim("ch4.t42_best_except_vgg16")
    vgg_mine, vgg_sdft, dense_mine, dense_sdft = (cell.value() for cell in c.cells)
    assert vgg_mine < vgg_sdft and dense_mine > dense_sdft and "except VGG16" in c.claim
    c = get_claim("ch3.t31_clip_i_sync")
    mine, *others = (cell.value() for cell in c.cells)
    assert all(mine < o for o in others)
    t61 = load_table("6.1").frame()
    unet = "LDM with the U-Net backbone"
    assert t61.loc[(unet, "5k steps without RIE"), "FID↓"] < t61.loc[(unet, "10k steps without RIE"), "FID↓"]
    assert "U-ViT" in get_claim("ch6.t61_5k_vs_10k").claim  # the backbone exception is stated


def test_ledger_fields_are_well_formed():
    for claim in load_ledger():
        assert claim.measure in MEASURES and claim.direction in ("higher", "lower")
        assert claim.b and claim.a not in claim.b, claim.id
        assert claim.registered_by.startswith(f"ch0{claim.chapter}"), claim.id
        assert (claim.max_ratio is not None) <= (claim.measure == "count"), claim.id


def test_unknown_claim_names_the_known_ones():
    with pytest.raises(KeyError, match="ch4.region_aware_alignment"):
        get_claim("ch9.none")


def test_claim_seeds_reads_the_profile_key_with_a_default_of_one():
    assert claim_seeds({}) == 1
    assert claim_seeds({"claims": {"seeds": 3}}) == 3
    with pytest.raises(ValueError, match="claims.seeds"):
        claim_seeds({"claims": {"seeds": 0}})


# ---------------------------------------------------------------- recording
class FakeRun:
    """The part of ChapterRun that record_claim uses (log_metric into a metrics dict)."""

    def __init__(self, chapter: str):
        self.chapter = chapter
        self.metrics: dict = {}

    def log_metric(self, table, row, column, value):
        self.metrics.setdefault(table, {}).setdefault(str(row), {})[str(column)] = value


def test_record_claim_stores_the_values_in_the_chapter_record():
    run = FakeRun("ch04_didgen")
    entry = record_claim(run, "ch4.region_aware_alignment", a=[0.6, 0.7], b=[0.2, 0.3], paired=True, seeds=1)
    stored = run.metrics[RECORD_TABLE]["ch4.region_aware_alignment"]
    assert stored["a"] == [0.6, 0.7] and stored["b"] == {"finetuning without the region-aware loss (mine-noregion)": [0.2, 0.3]}
    assert stored == entry
    assert stored["seeds"] == 1 and stored["measure"] == "paired"


def test_record_claim_takes_multi_arm_dicts_and_real_chapter_runs(tmp_path, monkeypatch):
    from ctrlgen import load_profile
    from ctrlgen.results import ChapterRun

    monkeypatch.setenv("CTRLGEN_OUTPUT_ROOT", str(tmp_path))
    run = ChapterRun("ch04_didgen", load_profile("smoke"))
    b = {"Mine-prefix": [30.0], "SD-Finetune": [31.0], "DreamBooth": [35.0]}
    record_claim(run, "ch4.t41_fid", a=[20.0], b=b, seeds=1)
    import json

    saved = json.loads(run.save().read_text())
    assert saved["metrics"]["claims"]["ch4.t41_fid"]["b"] == b


@pytest.mark.parametrize("kwargs, match", [
    (dict(claim_id="ch4.region_aware_alignment", a=[1, 2], b=[1]), "paired"),
    (dict(claim_id="ch4.region_aware_alignment", a=[1, 2], b=[1, 2], paired=False), "disagrees"),
    (dict(claim_id="ch4.t41_fid", a=[1.0], b=[2.0]), "pass b as a dict"),
    (dict(claim_id="ch4.t41_fid", a=[1.0], b={"SD-Finetune": [2.0]}), "arms"),
    (dict(claim_id="ch4.region_aware_alignment", a=[1, float("nan")], b=[1, 2]), "finite"),
    (dict(claim_id="ch4.t47_mask_diversity", a=[0.3, 0.4], b=[0.1, 0.2], seeds=3), "multiple of seeds"),
    (dict(claim_id="ch3.t31_dino", a=[1, 2], b={"CusDiff": [1, 2], "DisenDiff": [1, 2], "BAS": [1, 2]}), "registered by"),
])
def test_record_claim_rejects_bad_input_with_one_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        record_claim(FakeRun("ch04_didgen"), **kwargs)


# ---------------------------------------------------------------- statistics against scipy / closed forms
def test_paired_bootstrap_ci_matches_scipy_and_the_normal_closed_form():
    rng = np.random.default_rng(1)
    a = rng.normal(1.0, 1.0, 400)
    b = a - rng.normal(0.3, 0.5, 400)
    lo, hi = bootstrap_ci(a, b, paired=True, level=0.95, seed=7)
    ref = stats.bootstrap((a - b,), np.mean, n_resamples=9999, method="percentile", confidence_level=0.95,
                          random_state=np.random.default_rng(8)).confidence_interval
    assert lo == pytest.approx(ref.low, abs=0.01) and hi == pytest.approx(ref.high, abs=0.01)
    d = a - b  # closed form: mean ± z·sd/√n for a large sample
    half = stats.norm.ppf(0.975) * d.std(ddof=1) / np.sqrt(d.size)
    assert lo == pytest.approx(d.mean() - half, abs=0.01) and hi == pytest.approx(d.mean() + half, abs=0.01)


def test_unpaired_bootstrap_ci_matches_the_normal_closed_form():
    rng = np.random.default_rng(2)
    a, b = rng.normal(0.5, 1.0, 600), rng.normal(0.0, 2.0, 500)
    lo, hi = bootstrap_ci(a, b, paired=False, level=0.95, seed=3)
    se = np.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)
    centre = a.mean() - b.mean()
    assert lo == pytest.approx(centre - 1.96 * se, abs=0.02) and hi == pytest.approx(centre + 1.96 * se, abs=0.02)


def test_bootstrap_of_constant_differences_is_that_difference():
    assert bootstrap_ci([3, 4, 5], [1, 2, 3], paired=True, level=0.95, seed=0) == (2.0, 2.0)


def test_tests_are_scipys():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0, 1, 30), rng.normal(0.4, 1, 30)
    assert two_sided_test(a, b, "paired")[0] == pytest.approx(stats.wilcoxon(a, b).pvalue)
    assert two_sided_test(a, b, "unpaired")[0] == pytest.approx(stats.mannwhitneyu(a, b, alternative="two-sided").pvalue)
    assert two_sided_test(a[:4], b[:4], "per-seed")[0] == pytest.approx(stats.ttest_rel(a[:4], b[:4]).pvalue)
    assert two_sided_test([1, 2], [1, 2], "paired")[0] == 1.0


# ---------------------------------------------------------------- verdict rules, one hand-made case per branch
def _claim(**changes) -> Claim:
    base = Claim(id="t.x", chapter=4, section="4.4.5", ref="Table 4.7", claim="A beats B", quotes=("q",), metric="m",
                 direction="higher", a="A", b=("B",), measure="paired", training=False, registered_by="ch04_didgen")
    return replace(base, **changes)


def _entry(a, b, seeds=1):
    return {"a": list(map(float, a)), "b": b if isinstance(b, dict) else {"B": list(map(float, b))}, "seeds": seeds}


A = [0.9, 0.8, 0.85, 0.95, 0.7, 0.9, 0.8, 0.75, 0.88, 0.92, 0.81, 0.86]
B = [0.5, 0.4, 0.6, 0.5, 0.45, 0.55, 0.5, 0.4, 0.52, 0.6, 0.5, 0.47]


def test_reproduced_when_interval_above_zero_and_p_small():
    v = evaluate(_claim(), _entry(A, B))
    assert v.verdict == "reproduced" and "interval above 0" in v.reason
    c = v.comparisons[0]
    assert c.difference == pytest.approx(np.mean(A) - np.mean(B)) and c.ci[0] > 0 and c.p < ALPHA
    # the same numbers under a "lower is better" claim are the opposite direction
    v = evaluate(_claim(direction="lower"), _entry(A, B))
    assert v.verdict == "not reproduced" and "opposite" in v.reason and v.comparisons[0].ci[1] < 0


def test_not_reproduced_when_the_run_goes_the_other_way():
    v = evaluate(_claim(), _entry(B, A))
    assert v.verdict == "not reproduced" and v.comparisons[0].signed < 0


def test_inconclusive_when_the_interval_includes_zero():
    noise = [0.01, -0.02, 0.015, -0.01, 0.0, 0.02, -0.015, 0.01]
    v = evaluate(_claim(), _entry(np.add(0.5, noise), [0.5] * 8))
    assert v.verdict == "inconclusive"
    lo, hi = v.comparisons[0].ci
    assert lo <= 0 <= hi


def test_not_run_says_why_and_never_disappears():
    claim = get_claim("ch5.t53_s06")
    records = {"ch04_didgen": {"chapter": "ch04_didgen", "metrics": {}}}
    out = {v.claim.id: v for v in verdicts(records)}
    assert set(out) == {c.id for c in load_ledger()}
    assert out[claim.id].verdict == "not run" and "ch05" in out[claim.id].reason
    assert "has no measurement" in out["ch4.region_aware_alignment"].reason


def test_one_training_seed_per_seed_claim_is_inconclusive_and_says_so():
    v = evaluate(_claim(measure="per-seed", training=True), _entry([0.4], [0.2], seeds=1))
    assert v.verdict == "inconclusive" and v.single_seed
    assert "one training seed per arm" in v.reason and "claimed direction" in v.reason
    assert "rests on one training seed" in v.reason


def test_per_sample_claim_on_one_training_seed_keeps_its_verdict_and_says_so():
    v = evaluate(_claim(training=True), _entry(A, B, seeds=1))
    assert v.verdict == "reproduced" and v.single_seed and "not training variation" in v.reason
    v3 = evaluate(_claim(training=True), _entry(A, B, seeds=3))
    assert not v3.single_seed and "training seed" not in v3.reason


def test_per_seed_claim_with_seeds_uses_a_paired_t_test():
    a, b = [0.61, 0.64, 0.60, 0.63], [0.52, 0.50, 0.55, 0.51]
    v = evaluate(_claim(measure="per-seed", training=True), _entry(a, b, seeds=4))
    assert v.comparisons[0].p == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert v.comparisons[0].test == "paired t-test"


def test_multi_arm_claims_split_alpha_and_need_every_arm():
    arms = {"B": B, "C": list(np.add(B, 0.1))}
    v = evaluate(_claim(b=("B", "C")), _entry(A, arms))
    assert v.verdict == "reproduced" and "0.05/2" in v.reason
    arms["C"] = list(np.add(A, [0.01, -0.01] * 6))  # C is as good as A: that arm is inconclusive
    assert evaluate(_claim(b=("B", "C")), _entry(A, arms)).verdict == "inconclusive"
    arms["C"] = list(np.add(A, 0.2))  # C beats A: the claim "A is best" is not reproduced
    assert evaluate(_claim(b=("B", "C")), _entry(A, arms)).verdict == "not reproduced"


def test_count_claims_are_exact_and_check_the_stated_ratio():
    claim = _claim(measure="count", direction="lower", max_ratio=0.55)
    assert evaluate(claim, _entry([50], [100])).verdict == "reproduced"
    v = evaluate(claim, _entry([75], [100]))
    assert v.verdict == "not reproduced" and "ratio 0.75" in v.reason
    assert evaluate(claim, _entry([120], [100])).verdict == "not reproduced"
    assert evaluate(claim, _entry([100], [100])).verdict == "inconclusive"


def test_relative_gain_is_against_the_compared_arm():
    v = evaluate(_claim(relative=True), _entry([1.1] * 3 + [1.2], [1.0] * 4))
    assert v.comparisons[0].relative == pytest.approx((1.125 - 1.0) / 1.0)


# ---------------------------------------------------------------- integrity of records
def test_check_records_reports_chapters_whose_claims_are_missing():
    ledger = load_ledger()
    ch04 = [c.id for c in ledger if c.registers("ch04_didgen")]
    assert "ch4.region_aware_alignment" in ch04 and "ch4.t45_vs_original" not in ch04
    complete = {"ch04_didgen": {"metrics": {RECORD_TABLE: {cid: {} for cid in ch04}}}}
    assert check_records(ledger, complete) == {}
    partial = {"ch04_didgen": {"metrics": {RECORD_TABLE: {cid: {} for cid in ch04[1:]}}},
               "ch02_background": {"metrics": {}}, "appx_data": {"metrics": {}}}
    assert check_records(ledger, partial) == {"ch04_didgen": [ch04[0]], "ch02_background": ["ch2.self_attention_refines"]}
    # a chapter that ran but recorded none of its claims has every one of them reported missing
    assert "ch5.t53_s06" in check_records(ledger, {"ch05_lowcontrast": {"metrics": {}}})["ch05_lowcontrast"]


def test_ledger_table_renders_every_claim_with_its_verdict():
    run = FakeRun("ch04_didgen")
    record_claim(run, "ch4.region_aware_alignment", a=A, b=B, seeds=1)
    frame = ledger_table({"ch04_didgen": {"chapter": "ch04_didgen", "metrics": run.metrics}})
    assert len(frame) == len(load_ledger())
    row = frame.loc["ch4.region_aware_alignment"]
    assert row["verdict"] == "reproduced" and "one training seed" in row["reason"]
    assert "Wilcoxon" in row["this run"]
    assert frame.loc["ch3.t31_clip_i_sync", "verdict"] == "not run"
    assert "0.062" in frame.loc["ch3.t31_clip_i_sync", "thesis evidence"]


def test_no_chapter_cell_ends_by_displaying_a_claim_record():
    """``record_claim`` returns the stored entry; as a cell's last expression the page would print the whole
    record (hundreds of per-sample values) — a chapter cell must not end with a bare call."""
    offenders = []
    for chapter in sorted((Path(__file__).resolve().parents[1] / "chapters").glob("*.py")):
        for cell in re.split(r"^# %%.*$", chapter.read_text(), flags=re.M):
            try:
                body = ast.parse(cell).body
            except SyntaxError:
                continue  # markdown cells are comments; a broken cell is test_book's to report
            last = body[-1] if body else None
            if (isinstance(last, ast.Expr) and isinstance(last.value, ast.Call)
                    and getattr(last.value.func, "id", "") == "record_claim"):
                offenders.append(chapter.name)
    assert offenders == []
