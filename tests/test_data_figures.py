"""The data appendix's figures (``ctrlgen.data.figures``): what each panel draws, checked on hand-made frames."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from ctrlgen import data  # noqa: E402
from ctrlgen.data.figures import label_cooccurrence, plot_ita_changes  # noqa: E402


def _changes() -> pd.DataFrame:
    frame = {}
    for part, old, new in (("skin", [10.0, -80.0, 30.0, 50.0], [10.0, 100.0, 30.0, 50.0]),
                           ("lesion", [0.0, 5.0, 5.0, 5.0], [0.0, 5.0, 5.0, 5.0]),
                           ("difference", [10.0, -85.0, 25.0, 45.0], [10.0, 95.0, 25.0, 45.0])):
        frame[f"ita_{part}_old"], frame[f"ita_{part}_new"] = old, new
    return pd.DataFrame(frame)


def test_ita_histograms_overlay_both_formulas_on_shared_bins():
    fig = plot_ita_changes(_changes(), bins=4)
    try:
        axes = fig.axes
        assert [ax.get_title() for ax in axes] == ["ITA skin (degrees)", "ITA lesion (degrees)", "ITA difference (degrees)"]
        skin_old, skin_new = axes[0].containers
        # skin: 4 bins over [-80, 100] (edges -80, -35, 10, 55, 100): 10, 30 and 50 share the third bin;
        # arctan puts the bluish skin's -80 in the first bin, atan2 its 100 in the last
        assert [p.get_height() for p in skin_old] == [1, 0, 3, 0]
        assert [p.get_height() for p in skin_new] == [0, 0, 3, 1]
        assert [p.get_x() for p in skin_old] == pytest.approx([-80, -35, 10, 55])
        assert [p.get_x() for p in skin_old] == [p.get_x() for p in skin_new]  # the same edges for both
        assert [t.get_text() for t in axes[0].get_legend().get_texts()] == ["arctan", "atan2"]
    finally:
        plt.close(fig)


def test_ita_histograms_name_a_missing_column():
    with pytest.raises(KeyError, match="ita_lesion_old"):
        plot_ita_changes(_changes().drop(columns="ita_lesion_old"))


def test_label_cooccurrence_by_hand():
    labels = pd.DataFrame({"A": [1.0, 1.0, 0.0, -1.0], "B": [1.0, 0.0, 1.0, 1.0]})
    matrix = label_cooccurrence(labels)
    # P(B | A) = 1/2 (A positive twice, once with B); P(A | B) = 1/3; the diagonal is 1
    np.testing.assert_allclose(matrix.to_numpy(), [[1.0, 0.5], [1 / 3, 1.0]])


def test_the_data_figures_module_no_longer_reexports_image_grid():
    assert not hasattr(data.figures, "image_grid")  # the generic grid is ctrlgen.figures.image_grid
