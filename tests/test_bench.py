"""The CPU benchmark behind BENCHMARKS.md runs and reports sane figures (a smoke run, not timed)."""

from train.bench import measure


def test_bench_scenario_reports_step_time_memory_and_overhead():
    result = measure(64, False, steps=10)
    assert 0 < result["forward_backward_s"] and 0 < result["step_s"] < 60
    assert 0 <= result["outside_share"] < 1
    assert result["peak_rss_mib"] > 100


def test_intake_bench_reads_every_photo():
    from train.bench import measure_intake

    result = measure_intake(count=3, width=800, height=600, resolution=64)
    assert result["images"] == 3 and result["intake_s"] > 0 and result["full_decode_s"] > 0
