"""The canary's sequential test: hand-computed statistics, the duality of the mSPRT and its confidence
sequence, and the always-valid property in a seeded simulation that peeks after every rating."""

import math

import numpy as np
import pytest

from rlhf_online.canary import stats

ALPHA = 0.05

# ---- hand-computed cases ---------------------------------------------------------------------------------


def test_difference_adds_one_thumb_up_and_one_down_per_arm():
    # canary 3 of 8 -> 4/10 = 0.4; stable 5 of 18 -> 6/20 = 0.3
    theta_hat, variance = stats.difference(3, 8, 5, 18)
    assert theta_hat == pytest.approx(0.1)
    assert variance == pytest.approx(0.4 * 0.6 / 8 + 0.3 * 0.7 / 18)  # 0.03 + 0.011667


def test_difference_of_an_all_down_arm_keeps_a_positive_variance():
    theta_hat, variance = stats.difference(0, 10, 10, 10)
    assert theta_hat == pytest.approx(1 / 12 - 11 / 12)
    assert variance == pytest.approx(2 * (1 / 12) * (11 / 12) / 10)


def test_mixture_log_lr_by_hand():
    # V = tau^2 = 0.0025, theta_hat - theta0 = 0.1:
    # 0.5 log(1/2) + 0.0025 * 0.01 / (2 * 0.0025 * 0.005) = 1 - 0.3466
    log_lr = stats.mixture_log_lr(0.12, 0.0025, 0.02, 0.05)
    assert log_lr == pytest.approx(1.0 - 0.5 * math.log(2.0))
    assert stats.always_valid_p(log_lr) == pytest.approx(math.exp(-0.6534264), rel=1e-6)  # 0.5203


def test_mixture_is_below_one_at_the_null_value():
    """theta_hat = theta0: Lambda = sqrt(V / (V + tau^2)) < 1, so the p-value stays 1."""
    assert stats.mixture_log_lr(0.3, 0.0025, 0.3, 0.05) == pytest.approx(0.5 * math.log(0.5))
    assert stats.always_valid_p(stats.mixture_log_lr(0.3, 0.0025, 0.3, 0.05)) == 1.0


def test_cs_radius_by_hand():
    # V = tau^2 = 0.0025: sqrt(0.0025 * 0.005 / 0.0025 * (2 log 20 + log 2)) = sqrt(0.005 * 6.684612)
    assert stats.cs_radius(0.0025, 0.05, 0.05) == pytest.approx(math.sqrt(0.005 * 6.684612), rel=1e-6)
    assert stats.cs_radius(0.0025, 0.05, 0.05) == pytest.approx(0.182820, abs=1e-6)


def test_always_valid_p_is_the_running_minimum():
    p, seen = 1.0, []
    for log_lr in (-0.2, 1.0, 0.5, 3.0, 2.0):
        p = stats.always_valid_p(log_lr, p)
        seen.append(float(p))
    assert seen == pytest.approx([1.0, math.exp(-1), math.exp(-1), math.exp(-3), math.exp(-3)])


# ---- properties ------------------------------------------------------------------------------------------


def test_confidence_sequence_is_the_set_the_msprt_does_not_reject():
    """At the bounds Lambda = 1/alpha exactly, inside it is smaller, outside larger (the inversion)."""
    theta_hat, lower, upper = stats.confidence_sequence(40, 120, 300, 1000, ALPHA, 0.05)
    _, variance = stats.difference(40, 120, 300, 1000)
    for bound in (lower, upper):
        assert stats.mixture_log_lr(theta_hat, variance, bound, 0.05) == pytest.approx(math.log(1 / ALPHA))
    for inside in (theta_hat, 0.6 * lower + 0.4 * upper):
        assert stats.mixture_log_lr(theta_hat, variance, inside, 0.05) < math.log(1 / ALPHA)
    for outside in (lower - 0.01, upper + 0.01):
        assert stats.mixture_log_lr(theta_hat, variance, outside, 0.05) > math.log(1 / ALPHA)


def test_radius_is_wider_than_a_fixed_sample_interval_and_shrinks():
    """Peeking has a price: the radius is above 1.96 sqrt(V) at every V, and still goes to 0 with V."""
    variance = np.geomspace(1e-1, 1e-7, 60)  # more ratings to the right
    radius = stats.cs_radius(variance, ALPHA, 0.05)
    assert np.all(radius > 1.96 * np.sqrt(variance))
    assert np.all(np.diff(radius) < 0)
    assert radius[-1] < 0.002


def test_arrays_and_floats_agree():
    ups_c, n_c, ups_s, n_s = (
        np.array([3, 40, 0]),
        np.array([8, 120, 5]),
        np.array([5, 300, 5]),
        np.array([18, 1000, 5]),
    )
    together = stats.confidence_sequence(ups_c, n_c, ups_s, n_s, ALPHA, 0.05)
    for i in range(3):
        alone = stats.confidence_sequence(int(ups_c[i]), int(n_c[i]), int(ups_s[i]), int(n_s[i]), ALPHA, 0.05)
        assert [float(t[i]) for t in together] == pytest.approx([float(a) for a in alone])


# ---- always valid under peeking --------------------------------------------------------------------------


def simulate_streams(rng, trials: int, ratings: int, share: float, p_canary: float, p_stable: float):
    """Cumulative counts after every rating of `trials` random streams: each (trials, ratings)."""
    canary = rng.random((trials, ratings)) < share
    up = rng.random((trials, ratings)) < np.where(canary, p_canary, p_stable)
    n_c, ups_c = np.cumsum(canary, 1), np.cumsum(canary & up, 1)
    n_s, ups_s = np.cumsum(~canary, 1), np.cumsum(~canary & up, 1)
    return n_c, ups_c, n_s, ups_s


def ever_excludes(theta, lower, upper, ready) -> np.ndarray:
    """(trials,) bool: the interval missed theta at some rating where both arms were ready."""
    return np.any(ready & ((lower > theta) | (upper < theta)), axis=1)


@pytest.mark.parametrize(
    ("share", "p_canary", "p_stable"), [(0.5, 0.3, 0.3), (0.2, 0.25, 0.3)], ids=["equal-half", "worse-fifth"]
)
def test_peeking_after_every_rating_keeps_the_error_at_most_alpha(share, p_canary, p_stable):
    """2000 streams of 2000 ratings, the sequence read after every one: it misses the true difference in at
    most alpha of them (plus 3 Monte Carlo standard errors, 0.014), while the fixed-sample 95% interval read
    the same way misses it in far more: the simulation is able to see an inflated error."""
    trials, theta, min_per_arm = 2000, p_canary - p_stable, 50
    n_c, ups_c, n_s, ups_s = simulate_streams(
        np.random.default_rng(7), trials, 2000, share, p_canary, p_stable
    )
    ready = (n_c >= min_per_arm) & (n_s >= min_per_arm)
    n_c, n_s = np.maximum(n_c, 1), np.maximum(n_s, 1)  # (trials, ratings); not ready where 0 anyway

    _, lower, upper = stats.confidence_sequence(ups_c, n_c, ups_s, n_s, ALPHA, 0.05)
    always_valid = ever_excludes(theta, lower, upper, ready).mean()

    theta_hat, variance = stats.difference(ups_c, n_c, ups_s, n_s)
    fixed = 1.96 * np.sqrt(variance)
    naive = ever_excludes(theta, theta_hat - fixed, theta_hat + fixed, ready).mean()

    slack = 3 * math.sqrt(ALPHA * (1 - ALPHA) / trials)
    assert always_valid <= ALPHA + slack, f"always-valid sequence missed in {always_valid:.3f} of streams"
    assert naive > 3 * ALPHA, f"naive peeking missed in only {naive:.3f}: the check cannot see inflation"
