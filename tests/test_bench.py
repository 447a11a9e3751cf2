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
