"""The CPU benchmark behind BENCHMARKS.md runs and reports sane figures (a smoke run, not timed)."""

from train.bench import measure


def test_bench_scenario_reports_step_time_memory_and_overhead():
    result = measure(64, False, steps=10)
    assert 0 < result["forward_backward_s"] and 0 < result["step_s"] < 60
    assert 0 <= result["outside_share"] < 1
    assert result["peak_rss_mib"] > 100
