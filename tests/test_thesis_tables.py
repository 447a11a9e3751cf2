"""The thesis's reported tables: complete, well-formed, and verbatim against the thesis text."""
from __future__ import annotations

import re

import pandas as pd
import pytest

from ctrlgen.thesis import NOT_RUN, compare, load_table, side_by_side, table_ids

EXPECTED = {f"2.1"} | {f"3.{i}" for i in range(1, 7)} | {f"4.{i}" for i in range(1, 8)} | \
    {f"5.{i}" for i in range(1, 6)} | {f"6.{i}" for i in range(1, 6)}


def test_every_table_of_chapters_2_to_6_is_there():
    assert set(table_ids()) == EXPECTED


@pytest.mark.parametrize("table_id", sorted(EXPECTED))
def test_table_is_well_formed(table_id):
    table = load_table(table_id)
    frame = table.frame()
    assert frame.shape == (len(table.rows), len(table.columns))
    assert not frame.index.duplicated().any()
    for _, values in table.rows:
        assert all(v is None or isinstance(v, (int, float, str)) for v in values)


def _table_block(text: str, table_id: str) -> str:
    start = text.index(f"Table {table_id}:")
    nxt = re.search(r"\n(Table \d\.\d+:|\d\.\d+(\.\d+)? [A-Z])", text[start + 10:])
    return text[start: start + 10 + (nxt.start() if nxt else 4000)]


def _numbers(text: str) -> list[float]:
    return [float(m.replace(",", "")) for m in re.findall(r"(?<![\w.])\d[\d,]*\.?\d*", text)]


@pytest.mark.parametrize("table_id", sorted(EXPECTED))
def test_numbers_appear_in_the_thesis_table(thesis_text, table_id):
    """Independent check: every numeric cell occurs in that table's block of the thesis text."""
    table = load_table(table_id)
    assert table.title.split()[0].lower() in _table_block(thesis_text, table_id).lower()
    printed = _numbers(_table_block(thesis_text, table_id))
    for index, values in table.rows:
        for value in values:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                assert any(abs(value - p) < 1e-9 for p in printed), f"Table {table_id} row {index}: {value} not in thesis"


def test_known_cells_spot_check():
    t31 = load_table("3.1").frame()
    assert t31.loc[("Single concept", "CLIP-I ↑"), "Mine"] == pytest.approx(0.576)
    t32 = load_table("3.2").frame()
    assert t32.loc["Mine", ("Concept group", "DINO")] == pytest.approx(0.723)


def test_side_by_side_never_copies_thesis_numbers_into_the_run_column():
    thesis = load_table("3.1").frame()
    run = pd.DataFrame({"Mine": [0.5]}, index=pd.MultiIndex.from_tuples([("Single concept", "CLIP-I ↑")]))
    frame = side_by_side("3.1", run, profile="smoke")
    assert ("Mine", "thesis") in frame.columns and ("Mine", "this run (smoke)") in frame.columns
    assert ("CusDiff", "thesis") not in frame.columns  # only the columns the run reports
    assert frame.loc[("Single concept", "CLIP-I ↑"), ("Mine", "this run (smoke)")] == 0.5
    assert frame.loc[("Single concept", "CLIP-I ↑"), ("Mine", "thesis")] == thesis.loc[("Single concept", "CLIP-I ↑"), "Mine"]
    assert frame.loc[("Concept group", "DINO ↑"), ("Mine", "this run (smoke)")] == NOT_RUN
    html = compare("3.1", run, profile="smoke").to_html()
    assert "Table 3.1" in html and "not run yet" in html


def test_unknown_table_lists_the_known_ones():
    with pytest.raises(KeyError, match="known tables: 2.1, 3.1"):
        load_table("9.9")

def test_in_text_numbers_are_quoted_verbatim_from_the_thesis(thesis_text):
    """Each in-text number's quote occurs in the thesis (whitespace-normalised) and contains its value."""
    from ctrlgen.thesis import _in_text, in_text

    flat = " ".join(thesis_text.split())
    for key in _in_text():
        number = in_text(key)
        assert number.quote in flat, key
        assert number.value in number.quote, key
    with pytest.raises(KeyError, match="didgen.pair_iou"):
        in_text("no.such.number")


def test_direction_table_reads_lower_and_higher_is_better_and_claims():
    from ctrlgen.thesis import Direction, direction_table

    t = direction_table([
        Direction("FID: mine vs sd", 10.0, 12.0, higher_is_better=False, thesis_a=8.9, thesis_b=12.8),
        Direction("LPIPS: w/ vs w/o", 0.2, 0.3, higher_is_better=True, thesis_a=0.403, thesis_b=0.172),
        Direction("IoU: mine vs noregion", 0.6, 0.1, higher_is_better=True, thesis_claim="Fig. 4.7a"),
        Direction("speed", 1.0, 1.0, higher_is_better=True, thesis_claim="faster"),
        Direction("no thesis", 1.0, 2.0, higher_is_better=True),
    ])
    assert list(t["same direction"]) == ["yes", "no", "yes", "no", "–"]
    assert t.loc["FID: mine vs sd", "thesis"] == "A better (8.900 vs 12.800)"
    assert t.loc["speed", "this run"].startswith("tie")
