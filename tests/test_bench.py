"""The benchmark runs end to end and reports ratios (it is a measurement, never a timed assertion)."""
from __future__ import annotations

import json

import pytest

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


def test_flop_counter_matches_the_closed_form_of_a_matmul_and_a_linear_layer():
    """2·m·n·k for an (m×k)·(k×n) product; a linear layer's forward is one such product (bias not counted)."""
    import torch

    from ctrlgen.bench import count_flops

    a, b = torch.randn(3, 5), torch.randn(5, 7)
    assert count_flops(lambda: a @ b) == 2 * 3 * 5 * 7
    layer = torch.nn.Linear(5, 7)
    assert count_flops(lambda: layer(a)) == 2 * 3 * 5 * 7


def test_flops_benchmark_reports_counts_rates_and_the_matmul_rate(capsys):
    assert main(["bench", "flops", "--profile", "smoke", "--batch", "2", "--repeats", "1"]) == 0
    report = json.loads((paths.output_root() / "bench" / "flops-smoke.json").read_text())
    train, sample = report["steps"]["training step"], report["steps"]["sampling step"]
    assert train["GFLOP"] > sample["GFLOP"] > 0  # backward costs about twice the forward
    for step in (train, sample):
        assert abs(step["GFLOP/s"] - step["GFLOP"] / step["seconds_median"]) < 1e-9 * step["GFLOP/s"] + 1e-12
        assert step["fraction_of_matmul_rate"] == pytest.approx(step["GFLOP/s"] / report["matmul_GFLOP/s"], rel=1e-9)
    assert report["torch"] and report["cpus"] >= 1 and "written to" in capsys.readouterr().out


def test_dual_branch_benchmark_counts_half_the_denoising_passes_and_reports_the_fields(capsys):
    """Benchmark 3 (issue 18): T denoising passes for the dual-branch model against 2T for the two-stage pipeline,
    counted on the U-Net's calls (exactly 0.5); wall time reported as a ratio of medians, never asserted."""
    assert main(["bench", "dual", "--profile", "smoke", "--repeats", "1", "--targets", "1"]) == 0
    report = json.loads((paths.output_root() / "bench" / "dual-smoke.json").read_text())
    passes, steps = report["passes"], report["steps"]
    assert passes["dual_branch"]["denoising"] == steps and passes["two_stage"]["denoising"] == 2 * steps
    assert report["ratio_denoising_passes"] == 0.5
    assert passes["dual_branch"]["guidance"] == passes["two_stage"]["guidance"] > 0  # guidance included in both
    median = report["seconds_median"]
    assert set(median) == {"dual_branch", "two_stage"} and len(report["seconds"]["two_stage"]) == 1
    assert report["ratio_wall_time"] == median["dual_branch"] / median["two_stage"]
    assert report["target_wall_ratio"] == 0.6 and report["bifurcation_step"] == steps // 2
    assert report["torch"] and report["diffusers"] and report["cpus"] >= 1 and report["machine"]
    out = capsys.readouterr().out
    assert "machine:" in out and "written to" in out
