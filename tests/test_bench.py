"""The benchmark runs end to end and reports ratios (it is a measurement, never a timed assertion)."""
from __future__ import annotations

import json
import os

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


# ---------------------------------------------------------------- benchmarks 1, 2, 4, 5, 6 (issue 18)
def _report(name: str) -> dict:
    return json.loads((paths.output_root() / "bench" / f"{name}.json").read_text())


def _assert_machine(report: dict) -> None:
    assert report["torch"] and report["diffusers"] and report["cpus"] >= 1
    assert report["machine"] and report["written_at"]


def test_capture_bound_is_the_closed_form():
    """4 bytes · B · (Σ_cross r²·T + Σ_self r⁴): batch 2, cross 16, self 32, 77 tokens, by hand."""
    from ctrlgen.bench import capture_bound_bytes

    assert capture_bound_bytes(2, [16], [32], 77) == 4 * 2 * (256 * 77 + 1024 * 1024) == 8_546_304
    assert capture_bound_bytes(1, [], [], 77) == 0


def test_capture_benchmark_stores_only_the_selected_layers_within_the_bound(capsys):
    """Benchmark 1: plain vs capture timed (ratio of medians, never asserted); the store after one step holds exactly
    the selected sides, each the mean of every layer of that side and of no other layer, in ``bound_bytes``."""
    assert main(["bench", "capture", "--profile", "smoke", "--steps", "2", "--repeats", "2"]) == 0
    report = _report("capture-smoke")
    median = report["seconds_median"]
    assert set(median) == {"plain", "capture"} and len(report["seconds"]["capture"]) == 2
    assert report["ratio_capture_vs_plain"] == median["capture"] / median["plain"] and report["target_capture"] == 1.15
    maps = report["stored_maps"]
    assert maps["sides"] == {"cross": [report["cross_res"]], "self": [report["self_res"]]}
    assert all(v["averaged"] == v["in_unet"] > 0 for v in maps["layer_maps"].values())
    assert sum(v["averaged"] for v in maps["layer_maps"].values()) < maps["attention_layers_in_unet"]
    assert maps["stored_bytes"] == maps["bound_bytes"] and maps["batch"] == 1  # the conditional half only
    _assert_machine(report)
    assert "machine:" in capsys.readouterr().out


def test_guided_benchmark_reports_the_ratio(capsys):
    assert main(["bench", "guided", "--profile", "smoke", "--steps", "2", "--repeats", "1"]) == 0
    report = _report("guided-smoke")
    median = report["seconds_median"]
    assert set(median) == {"plain", "guided"} and report["guided_steps"] == 1 and report["benchmark"] == 2
    assert report["ratio_guided_vs_plain"] == median["guided"] / median["plain"] and report["target_guided"] == 2.2
    assert set(report["peak_memory_delta_mib"]) == {"plain", "guided"}
    _assert_machine(report)


def test_finetune_benchmark_times_both_arms_and_only_the_region_aware_one_has_the_attention_loss(capsys):
    """Benchmark 4: the region-aware arm's history carries L_attn ("attn"), the plain arm's does not."""
    assert main(["bench", "finetune", "--profile", "smoke", "--steps", "2", "--repeats", "1"]) == 0
    report = _report("finetune-smoke")
    assert "attn" in report["history_keys"]["region_aware"] and "attn" not in report["history_keys"]["plain"]
    median = report["seconds_per_step_median"]
    assert report["ratio_region_aware_vs_plain"] == median["region_aware"] / median["plain"]
    assert report["target"] == 1.3 and report["steps"] == 2 and report["alpha"] > 0
    _assert_machine(report)


def test_measure_peak_sees_a_64_mib_tensor():
    """A float32 tensor of 16 Mi values written in full is 64 MiB resident: the delta sees at least that."""
    import torch

    from ctrlgen.bench import measure_peak

    held = []
    got = measure_peak(lambda: held.append(torch.ones(16 * 2**20)))
    assert got["delta_mib"] >= 63 and got["peak_mib"] >= got["baseline_mib"] + 63, got
    assert "RSS" in got["kind"]


def test_memory_benchmark_measures_every_mode_and_the_maps_stay_within_the_bound(capsys):
    """Benchmark 5 on smoke: every mode measured; the capture and the largest capture (every side of both kinds)
    store exactly ``capture_bound_bytes``; the finetuning steps need more than a sampling step."""
    assert main(["bench", "memory", "--profile", "smoke", "--train", "yes"]) == 0
    report = _report("memory-smoke")
    modes = report["modes"]
    assert set(modes) == {"sampling step (plain)", "sampling step (capture)", "sampling step (layout-guided)",
                          "largest capture", "finetuning step (plain)", "finetuning step (region-aware)"}
    assert all(m["delta_mib"] >= 0 for m in modes.values())
    for name in ("capture", "largest"):
        maps = report["stored_maps"][name]
        assert maps["stored_bytes"] == maps["bound_bytes"] > 0
        assert all(v["averaged"] == v["in_unet"] for v in maps["layer_maps"].values())
    largest = report["stored_maps"]["largest"]
    assert sum(v["averaged"] for v in largest["layer_maps"].values()) == largest["attention_layers_in_unet"]
    _assert_machine(report)


def test_real_sd21_capture_stays_within_the_bound_on_the_meta_device():
    """The real SD 2.1-base U-Net (published config, no weights: meta tensors) at a 64x64 latent under
    classifier-free guidance: the thesis's capture (cross 16, self 32) keeps 4.1 MiB, the largest (every side,
    self at 64 included) 4 · (Σ r²·77 + Σ r⁴) bytes — of 32 attention layers, only the selected ones
    feed it."""
    import torch
    from diffusers import UNet2DConditionModel

    from ctrlgen.attention import AttentionCapture
    from ctrlgen.bench import capture_bound_bytes, stored_maps
    from ctrlgen.models.sd import published_config

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(published_config("sd21_base", "unet"))
        z, emb = torch.randn(2, 4, 64, 64), torch.randn(2, 77, 1024)
    for cross, self_ in (([16], [32]), ([64, 32, 16, 8], [64, 32, 16, 8])):
        with AttentionCapture(unet, cross_res=cross, self_res=self_, latent_size=64, allow_large_self=True) as store:
            store.cfg_batch = True  # [uncond; cond]: the conditional half is stored
            unet(z, 10, encoder_hidden_states=emb)
        maps = stored_maps(store, unet, 64)
        assert maps["attention_layers_in_unet"] == 32 and maps["batch"] == 1
        assert maps["stored_bytes"] == capture_bound_bytes(1, cross, self_, 77)
        assert all(v["averaged"] == v["in_unet"] for v in maps["layer_maps"].values())
    assert capture_bound_bytes(1, [16], [32], 77) == 4_273_152  # 4 · (256 · 77 + 1024²)


def test_linear_fit_recovers_a_line_and_flags_a_square():
    from ctrlgen.bench import linear_fit

    line = linear_fit([1, 2, 4, 8], [0.5 + 2 * n for n in (1, 2, 4, 8)])
    assert line["intercept_s"] == pytest.approx(0.5) and line["slope_s"] == pytest.approx(2.0)
    assert line["r2"] == pytest.approx(1.0) and line["exponent_top"] == pytest.approx(1.0)
    square = linear_fit([1, 2, 4, 8], [n * n for n in (1, 2, 4, 8)])
    assert square["r2"] < 0.97 and square["exponent_top"] > 1.3  # 0.962 and 1.39 for n² on 1, 2, 4, 8


def test_chapter_times_reads_the_records_and_marks_chapters_not_run(tmp_path):
    from ctrlgen.bench import chapter_times

    (tmp_path / "results" / "smoke").mkdir(parents=True)
    (tmp_path / "results" / "smoke" / "ch02_background.json").write_text(
        json.dumps({"wall_time_s": 12.5, "started_at": "2026-11-30T08:00:00+00:00", "git_commit": "abc"}))
    got = chapter_times(tmp_path, ["smoke", "mini"], ["ch02_background", "ch03_attencraft"])
    assert got["smoke"]["ch02_background"]["wall_time_s"] == 12.5
    assert got["smoke"]["ch03_attencraft"] is None and got["mini"]["ch02_background"] is None


def test_book_benchmark_reports_chapters_growth_fits_and_a_figure(capsys):
    """Benchmark 6: per-chapter times from the records (None where not run), pairs timed in whole batches."""
    assert main(["bench", "book", "--profile", "smoke", "--sizes", "1,2"]) == 0
    report = _report("book-smoke")
    assert set(report["chapter_wall_time_s"]) == {"smoke", "mini"}
    assert set(report["chapter_wall_time_s"]["smoke"]) == set(report["chapters"])
    pairs = report["growth"]["generated pairs"]
    assert pairs["sizes"] == [report["pair_batch"], 2 * report["pair_batch"]]
    assert report["growth"]["training steps"]["sizes"] == [1, 2]
    assert set(pairs["fit"]) == {"intercept_s", "slope_s", "r2", "exponent_top"}
    assert (paths.output_root() / "bench" / report["figure"]).is_file()
    _assert_machine(report)


def test_bench_all_runs_every_benchmark_once_and_publishes_each(monkeypatch, tmp_path, capsys):
    """``ctrlgen bench all`` = benchmarks 1–8 in turn on the one profile (each replaced here by a recorder: the
    real ones are tested above), every report published as JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ctrlgen.bench import machine
    from ctrlgen.cli import bench as cli

    monkeypatch.setenv("CTRLGEN_OUTPUT_ROOT", str(tmp_path))
    ran = []

    def recorder(name):
        def fake(cfg, *args, **kwargs):
            ran.append((name, cfg.profile_name))
            return {"benchmark": name, **machine()}
        return fake

    for name in ("bench_capture", "bench_guided", "bench_dual", "bench_finetune", "bench_memory", "bench_book",
                 "bench_flops", "bench_parallel"):
        monkeypatch.setattr(cli, name, recorder(name))
    monkeypatch.setattr(cli, "growth_figure", lambda report: plt.figure())
    assert main(["bench", "all", "--profile", "smoke", "--repeats", "1"]) == 0
    assert [n for n, _ in ran] == ["bench_capture", "bench_guided", "bench_dual", "bench_finetune", "bench_memory",
                                   "bench_book", "bench_flops", "bench_parallel"]
    assert {p for _, p in ran} == {"smoke"}
    written = sorted(p.name for p in (tmp_path / "bench").glob("*.json"))
    assert written == sorted(f"{n}-smoke.json" for n in ("capture", "guided", "dual", "finetune", "memory", "book",
                                                          "flops", "parallel"))


def test_summary_rows_say_which_benchmarks_ran_and_which_did_not():
    from ctrlgen.bench import BENCHMARKS, summary_rows

    reports = [{"file": "capture-smoke.json", "source": "here", "ratio_capture_vs_plain": 1.1, "device": "cpu",
                "model": "mini (smoke)", "written_at": "2026-11-30T10:00:00+00:00"}]
    rows = summary_rows(reports)
    assert [r["benchmark"] for r in rows] == list(BENCHMARKS)
    assert rows[0]["result"] == "1.10 (target ≤ 1.15)" and rows[0]["where"] == "here"
    assert all(r["result"] == "not run" for r in rows[1:])


# ---------------------------------------------------------------- the command table (one handler for every benchmark)
@pytest.mark.parametrize("argv, function, args, written", [
    (["capture", "--arch", "sd14", "--device", "cuda:1", "--dtype", "float16", "--batch", "2", "--steps", "5",
      "--repeats", "4"], "bench_capture", ("sd14", "cuda:1", "float16", 2, 5, 4), "capture-sd14"),
    (["guided"], "bench_guided", ("", "cpu", "float32", 1, 0, 3), "guided-smoke"),
    (["attention", "--arch", "sd21_base"], "bench_attention", ("sd21_base", "cpu", "float32", 1, 0, 3),
     "attention-sd21_base"),
    (["pairs", "--pairs", "6"], "bench_pairs", (6, 3), "pairs-smoke"),
    (["flops", "--batch", "2", "--repeats", "1"], "bench_flops", (2, 1), "flops-smoke"),
    (["dual", "--targets", "3", "--device", "cuda"], "bench_dual", (3, 3, "cuda"), "dual-smoke"),
    (["finetune"], "bench_finetune", (3, 3), "finetune-smoke"),
    (["memory", "--arch", "sd21_base", "--latent", "32", "--train", "no"], "bench_memory",
     ("sd21_base", "cpu", "float32", 1, "no", 32), "memory-sd21_base-latent32"),
    (["memory"], "bench_memory", ("", "cpu", "float32", 1, "auto", 0), "memory-smoke"),
    (["book", "--profiles", "smoke", "--sizes", "1,3"], "bench_book", (("smoke",), (1, 3), 1), "book-smoke"),
])
def test_each_subcommand_calls_its_benchmark_with_its_options_and_writes_its_report(
        argv, function, args, written, monkeypatch, tmp_path, capsys):
    """Every row of the command table: the options reach the benchmark function in its parameter order (by hand
    for each), the report lands in ``<name>-<arch or profile>[-latent<N>].json``, exit code 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ctrlgen.bench import machine
    from ctrlgen.cli import bench as cli

    monkeypatch.setenv("CTRLGEN_OUTPUT_ROOT", str(tmp_path))
    calls = []

    def fake(cfg, *got):
        calls.append((cfg.profile_name, got[1:] if function == "bench_book" else got))
        return {"benchmark": function, **machine()}

    monkeypatch.setattr(cli, function, fake)
    monkeypatch.setattr(cli, "growth_figure", lambda report: plt.figure())
    assert main(["bench", *argv, "--profile", "smoke"]) == 0
    assert calls == [("smoke", args)]
    report = json.loads((tmp_path / "bench" / f"{written}.json").read_text())
    assert report["name"] == written and report["benchmark"] == function
    assert [p.name for p in (tmp_path / "bench").glob("*.json")] == [f"{written}.json"]
    out = capsys.readouterr().out
    assert ("machine:" in out) == (argv[0] not in ("attention", "pairs")) and "written to" in out


def test_book_sizes_that_are_not_integers_are_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "book", "--profile", "smoke", "--sizes", "1,two"])
    assert exit_info.value.code == 2
    assert "--sizes" in capsys.readouterr().err


def test_bench_parallel_times_three_arms_and_the_workers_train_the_same_models(monkeypatch, tmp_path):
    """Benchmark 8 on smoke: the two run_all arms (one thread each, in workers and here) give identical loss
    histories, and the report carries both ratios."""
    from ctrlgen.bench import bench_parallel
    from ctrlgen.config import load_profile

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    user_cache = tmp_path / "user-cache"
    monkeypatch.setenv("CTRLGEN_CACHE_ROOT", str(user_cache))
    report = bench_parallel(load_profile("smoke"), n_jobs=2, n_images=16, epochs=1)
    # its jobs trained in a scratch cache, removed afterwards: nothing reached the user's, whose root is restored
    assert not user_cache.exists() and os.environ["CTRLGEN_CACHE_ROOT"] == str(user_cache)
    assert set(report["seconds_median"]) == {"default threads", "jobs 1", "parallel"}
    assert report["workers"] == 2 and report["max_loss_difference_parallel_vs_jobs_1"] == 0.0
    assert report["ratio_parallel_vs_sequential"] == pytest.approx(
        report["seconds_median"]["parallel"] / report["seconds_median"]["default threads"])
