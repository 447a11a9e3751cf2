"""The benchmark runs end to end and reports ratios (it is a measurement, never a timed assertion)."""
from __future__ import annotations

import json

from ctrlgen import paths
from ctrlgen.cli.main import main


def test_attention_benchmark_reports_ratios_and_memory(capsys):
    assert main(["bench", "attention", "--profile", "smoke", "--steps", "2", "--repeats", "1"]) == 0
    report = json.loads((paths.output_root() / "bench" / "attention-smoke.json").read_text())
    assert set(report["seconds_median"]) == {"plain", "capture", "guided"}
    assert report["ratio_capture_vs_plain"] > 0 and report["ratio_guided_vs_plain"] > 0
    assert report["ratio_guided_vs_plain"] == report["seconds_median"]["guided"] / report["seconds_median"]["plain"]
    assert set(report["peak_memory_mib"]) == {"plain", "capture", "guided"}
    assert "written to" in capsys.readouterr().out


def test_pairs_benchmark_reports_pairs_per_minute_and_the_ratio(capsys):
    assert main(["bench", "pairs", "--profile", "smoke", "--repeats", "1"]) == 0
    report = json.loads((paths.output_root() / "bench" / "pairs-smoke.json").read_text())
    assert set(report["pairs_per_minute"]) == {"guided", "unguided"}
    s = report["seconds_median"]
    assert report["ratio_guided_vs_unguided"] == s["guided"] / s["unguided"]
    assert report["pairs_per_minute"]["guided"] == 60 * report["pairs"] / s["guided"]
