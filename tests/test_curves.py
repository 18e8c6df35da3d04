"""A noisy curve is reported by its two ends with their spread, never by two single endpoints."""

from __future__ import annotations

import pytest

from pipelines.rlhf.stage import curve_summary

# the demo's RLHF reward curve of issue 20: noise whose endpoints (0.41 -> 0.52) look like a gain
CURVE = [0.41, 0.47, 0.29, 0.42, 0.25, 0.31, 0.34, 0.21, 0.39, 0.52]


def test_rlhf_summary_gives_the_mean_and_sd_of_the_first_and_last_iterations():
    history = [{"iteration": i + 1, "reward_mean": v, "kl": 0.01 * i, "sync_s": 0.3} for i, v in enumerate(CURVE)]
    s = curve_summary(history)
    assert s["reward_mean_k"] == 3  # 10 points: a third, at most 5
    # by hand: first three 0.41, 0.47, 0.29 -> mean 0.39, sd sqrt(((.02)^2 + (.08)^2 + (.1)^2) / 2) = 0.09165
    assert s["reward_mean_first"] == pytest.approx(0.39)
    assert s["reward_mean_first_sd"] == pytest.approx(0.0916515, rel=1e-5)
    # last three 0.21, 0.39, 0.52 -> mean 0.37333, sd 0.15567: the "gain" is inside the spread
    assert s["reward_mean_last"] == pytest.approx(0.373333, rel=1e-5)
    assert s["reward_mean_last_sd"] == pytest.approx(0.1556706, rel=1e-5)
    assert s["kl_last"] == pytest.approx(0.08) and s["sync_s_last"] == 0.3


def test_rlhf_summary_of_a_single_iteration_has_no_curve_ends():
    s = curve_summary([{"iteration": 1, "reward_mean": 0.5, "kl": 0.0, "sync_s": 0.1}])
    assert "reward_mean_first" not in s and s["sync_s_last"] == 0.1
