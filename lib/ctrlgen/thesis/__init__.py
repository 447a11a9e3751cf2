"""The thesis's reported numbers, as data keyed by table id, and "thesis vs this run" tables.

Each table of chapters 2–6 is a YAML file in ``tables/`` (``table_4_1.yaml`` for Table 4.1) with the
caption, section, row and column labels exactly as in the thesis. These numbers are facts about the
thesis: a chapter shows them only in a column labelled "thesis", next to the numbers its own run
computed (DESIGN.md §5).

The claims ledger (the thesis's claims checked against every chapter's record) is ``ctrlgen.thesis.claims``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

import pandas as pd
import yaml

CITATION = (
    "Junjie Shentu. Controllable Generation with Diffusion Models and Applications in Medical Imaging. "
    "Doctoral thesis, Durham University, 2026. https://etheses.durham.ac.uk/id/eprint/16656/"
)

NOT_RUN = "not run yet"


@dataclass(frozen=True)
class ThesisTable:
    """One table as the thesis reports it."""

    id: str
    title: str
    section: str
    index_names: tuple[str, ...]
    columns: tuple[Any, ...]
    rows: tuple[tuple[tuple[str, ...], tuple[Any, ...]], ...]
    second_best: tuple[tuple[int, int], ...] = ()
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def frame(self):
        """The table as a pandas DataFrame (MultiIndex rows/columns where the thesis has levels)."""
        if len(self.index_names) > 1:
            index = pd.MultiIndex.from_tuples([r[0] for r in self.rows], names=list(self.index_names))
        else:
            index = pd.Index([r[0][0] for r in self.rows], name=self.index_names[0])
        if any(isinstance(c, (list, tuple)) for c in self.columns):
            columns = pd.MultiIndex.from_tuples([tuple(c) if isinstance(c, (list, tuple)) else (c,) for c in self.columns])
        else:
            columns = pd.Index(list(self.columns))
        return pd.DataFrame([list(r[1]) for r in self.rows], index=index, columns=columns)


def _file_name(table_id: str) -> str:
    return "table_" + table_id.replace(".", "_") + ".yaml"


def _tables_dir():
    return resources.files(__name__).joinpath("tables")


@lru_cache(maxsize=None)
def table_ids() -> tuple[str, ...]:
    """Ids of every transcribed table, in thesis order ("2.1", ..., "6.5")."""
    ids = []
    for entry in _tables_dir().iterdir():
        name = entry.name
        if name.startswith("table_") and name.endswith(".yaml"):
            chapter, number = name[len("table_"):-len(".yaml")].split("_")
            ids.append((int(chapter), int(number)))
    return tuple(f"{c}.{n}" for c, n in sorted(ids))


def _check(table_id: str, data: dict[str, Any]) -> None:
    where = f"thesis table {table_id} ({_file_name(table_id)})"
    if str(data.get("id")) != table_id:
        raise ValueError(f"{where}: id field is {data.get('id')!r}")
    width = len(data["columns"])
    depth = len(data["index_names"])
    seen = set()
    for i, row in enumerate(data["rows"]):
        if len(row["index"]) != depth or len(row["values"]) != width:
            raise ValueError(f"{where}: row {i} has {len(row['index'])} labels/{len(row['values'])} values, "
                             f"expected {depth}/{width}")
        key = tuple(row["index"])
        if key in seen:
            raise ValueError(f"{where}: duplicate row {key}")
        seen.add(key)


@lru_cache(maxsize=None)
def load_table(table_id: str) -> ThesisTable:
    """Table ``table_id`` (e.g. ``"4.1"``); KeyError naming the known ids when absent."""
    if table_id not in table_ids():
        raise KeyError(f"no thesis table {table_id!r}; known tables: {', '.join(table_ids())}")
    data = yaml.safe_load(_tables_dir().joinpath(_file_name(table_id)).read_text(encoding="utf-8"))
    _check(table_id, data)
    known = {"id", "title", "section", "index_names", "columns", "rows", "second_best", "notes"}
    return ThesisTable(
        id=table_id,
        title=data["title"],
        section=str(data.get("section", "")),
        index_names=tuple(data["index_names"]),
        columns=tuple(tuple(c) if isinstance(c, list) else c for c in data["columns"]),
        rows=tuple((tuple(r["index"]), tuple(r["values"])) for r in data["rows"]),
        second_best=tuple(tuple(p) for p in data.get("second_best", []) or []),
        notes=data.get("notes", "") or "",
        extra={k: v for k, v in data.items() if k not in known},
    )


@dataclass(frozen=True)
class InTextNumber:
    """A number the thesis states in its text (not in a table), e.g. ``in_text("didgen.pair_iou")``."""

    key: str
    value: str
    section: str
    quote: str
    extra: dict[str, Any] = field(default_factory=dict)


@lru_cache(maxsize=None)
def _in_text() -> dict[str, Any]:
    return yaml.safe_load(resources.files(__name__).joinpath("in_text.yaml").read_text(encoding="utf-8"))


def in_text(key: str) -> InTextNumber:
    """An in-text thesis number by key; KeyError naming the known keys when absent."""
    data = _in_text()
    if key not in data:
        raise KeyError(f"no in-text thesis number {key!r}; known: {', '.join(sorted(data))}")
    entry = dict(data[key])
    return InTextNumber(key, str(entry.pop("value")), str(entry.pop("section")), " ".join(str(entry.pop("quote")).split()), entry)


@dataclass(frozen=True)
class Direction:
    """One comparison "A vs B on a metric" in this run and, where the thesis reports it, in the thesis.

    ``thesis_a``/``thesis_b``: the thesis's numbers (from ``load_table``/``in_text``), or None with
    ``thesis_claim`` stating what the thesis shows without a number (e.g. a figure)."""

    comparison: str
    run_a: float
    run_b: float
    higher_is_better: bool
    thesis_a: float | None = None
    thesis_b: float | None = None
    thesis_claim: str = ""

    def run_says_a_better(self) -> bool:
        return self.run_a > self.run_b if self.higher_is_better else self.run_a < self.run_b

    def thesis_says_a_better(self) -> bool | None:
        if self.thesis_a is None or self.thesis_b is None:
            return True if self.thesis_claim else None
        return self.thesis_a > self.thesis_b if self.higher_is_better else self.thesis_a < self.thesis_b


def direction_table(directions: list[Direction], precision: int = 3):
    """A DataFrame, one row per comparison: the thesis's direction, this run's numbers and whether they agree.
    A claim-only thesis entry counts as "A better than B"; a tie in this run never agrees."""
    def verdict(a_better: bool | None) -> str:
        return "–" if a_better is None else ("A better" if a_better else "B better")

    rows = []
    for d in directions:
        thesis = d.thesis_says_a_better()
        numbers = (f" ({d.thesis_a:.{precision}f} vs {d.thesis_b:.{precision}f})"
                   if d.thesis_a is not None and d.thesis_b is not None else f" ({d.thesis_claim})" if d.thesis_claim else "")
        tie = d.run_a == d.run_b
        rows.append({"comparison (A vs B)": d.comparison, "thesis": verdict(thesis) + numbers,
                     "this run": ("tie" if tie else verdict(d.run_says_a_better()))
                     + f" ({d.run_a:.{precision}f} vs {d.run_b:.{precision}f})",
                     "same direction": "–" if thesis is None else ("yes" if not tie and thesis == d.run_says_a_better() else "no")})
    return pd.DataFrame(rows).set_index("comparison (A vs B)")


def thesis_frame(table_id: str):
    """Shorthand for ``load_table(table_id).frame()``."""
    return load_table(table_id).frame()


def side_by_side(table_id: str, this_run, profile: str = ""):
    """A DataFrame with, for each metric column, a "thesis" and a "this run (<profile>)" column.

    ``this_run`` is a DataFrame indexed like the thesis table (any subset of its rows and
    columns; rows the run adds are kept with an empty thesis cell). Cells the run has not produced
    read "not run yet" — never a thesis number in the run's column.
    """
    thesis = thesis_frame(table_id)
    run_label = f"this run ({profile})" if profile else "this run"
    columns = [c for c in thesis.columns if c in this_run.columns] or list(this_run.columns)
    rows = list(thesis.index) + [r for r in this_run.index if r not in thesis.index]
    out = {}
    for column in columns:
        key = column if isinstance(column, tuple) else (column,)
        out[(*key, "thesis")] = [thesis.at[r, column] if r in thesis.index and column in thesis.columns else None for r in rows]
        out[(*key, run_label)] = [this_run.at[r, column] if r in this_run.index and column in this_run.columns else NOT_RUN
                                  for r in rows]
    frame = pd.DataFrame(out, index=pd.Index(rows) if not isinstance(thesis.index, pd.MultiIndex)
                         else pd.MultiIndex.from_tuples(rows, names=thesis.index.names))
    frame.index.names = thesis.index.names
    return frame


def compare(table_id: str, this_run, profile: str = "", precision: int = 3):
    """``side_by_side`` rendered as a styled table with the thesis caption (for the book)."""
    table = load_table(table_id)
    frame = side_by_side(table_id, this_run, profile)

    def fmt(value: Any) -> str:
        if value is None or (isinstance(value, float) and value != value):
            return "–"
        if isinstance(value, float):
            return f"{value:.{precision}f}"
        return str(value)

    def shade(column):
        is_thesis = column.name[-1] == "thesis"
        return ["color: #666; font-style: italic" if is_thesis else "font-weight: 600"] * len(column)

    styler = frame.style.format(fmt).apply(shade, axis=0)
    return styler.set_caption(f"Table {table.id} — {table.title} (thesis §{table.section}) beside this run")
