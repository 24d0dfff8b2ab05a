"""The canary's sequential test: a normal-mixture confidence sequence on the gap between two thumbs-up rates.

theta = p_canary - p_stable is estimated after every rating from the two arms' thumbs up, each arm's rate
taken as (ups + 1) / (n + 2), one thumb up and one down added (Agresti and Caffo, "Simple and effective
confidence intervals for proportions and differences of proportions result from adding two successes and two
failures", Amer. Statist. 2000), with the plug-in (unpooled) variance:

    p~_c = (ups_c + 1) / (n_c + 2),  p~_s = (ups_s + 1) / (n_s + 2)
    theta_hat = p~_c - p~_s
    V         = p~_c (1 - p~_c) / n_c + p~_s (1 - p~_s) / n_s

The added thumbs keep V above zero when an arm is all up or all down early on, and pull theta_hat towards 0
while an arm is small: without them a small canary arm that happens to start low also gets a small variance
and is rolled back too often (at a 0.1 base rate, a 10% canary share and alpha 0.05, 5.1% of equal canaries
instead of 3.5%).

Normal mixture (Robbins 1970). theta_hat / V is, in "information time" 1 / V, approximately a Brownian motion
with drift theta (every rating adds information whichever arm it lands in, so unequal arms and any
interleaving are fine). Mixing its likelihood ratio over a prior theta - theta0 ~ N(0, tau^2) gives the
mixture likelihood ratio of the mSPRT (Johari, Koomen, Pekelis, Walsh, "Always Valid Inference: Continuous
Monitoring of A/B Tests", Operations Research 2022, the normal-mixture mSPRT for a difference of means; their
two-stream formula with V = (p_c (1 - p_c) + p_s (1 - p_s)) / n is the balanced case of the one here):

    Lambda(theta0) = sqrt(V / (V + tau^2)) * exp(tau^2 (theta_hat - theta0)^2 / (2 V (V + tau^2)))

Under theta = theta0 it is a nonnegative martingale, so by Ville's inequality P(sup_t Lambda_t >= 1/alpha)
<= alpha: the always-valid p-value p_t = min(p_{t-1}, 1 / Lambda_t) may be read after every rating.
Inverting it (the theta0 it does not reject) gives the normal-mixture confidence sequence of Howard,
Ramdas, McAuliffe, Sekhon, "Time-uniform, nonparametric, nonasymptotic confidence sequences" (Ann. Statist.
2021, the normal-mixture boundary), in the plug-in-variance form of Waudby-Smith et al., "Time-uniform
central limit theory and asymptotic confidence sequences" (Ann. Statist. 2024):

    theta_hat -/+ sqrt(V (V + tau^2) / tau^2 * (2 log(1/alpha) + log(1 + tau^2 / V)))

P(theta leaves the sequence at any rating) <= alpha, and each one-sided miss alone is <= alpha too (about
alpha / 2 in practice, since the two sides rarely both happen). With a plug-in variance of Bernoulli
ratings this holds asymptotically, not exactly: tests/test_canary_stats.py and
benchmarks/canary_error_rates.py measure it.

tau, in thumbs-up-rate units, tunes the test to an effect size: the radius is closest to a fixed-sample
interval's (sqrt(V) times 3.04 at alpha 0.05, against 1.96) where V = tau^2 / 8, and the radius is then
about tau. Decisions are made when the radius comes down to about the margin, so tau = margin is the default.

Every function works on floats and on numpy arrays of any (matching) shape alike.
"""

import numpy as np


def smoothed_rate(ups, n):
    """(ups + 1) / (n + 2): an arm's rate with one thumb up and one down added (never zero, never one)."""
    return (np.asarray(ups, dtype=float) + 1.0) / (np.asarray(n, dtype=float) + 2.0)


def difference(ups_canary, n_canary, ups_stable, n_stable):
    """theta_hat = p~_canary - p~_stable and its plug-in variance V (see the module docstring).

    Args:
        ups_canary, n_canary: thumbs up and ratings of the canary arm, n_canary >= 1.
        ups_stable, n_stable: the same for the stable arm over the same period, n_stable >= 1.

    Returns:
        (theta_hat, variance), each of the inputs' broadcast shape.
    """
    n_c, n_s = np.asarray(n_canary, dtype=float), np.asarray(n_stable, dtype=float)
    p_c, p_s = smoothed_rate(ups_canary, n_c), smoothed_rate(ups_stable, n_s)
    theta_hat = p_c - p_s
    variance = p_c * (1.0 - p_c) / n_c + p_s * (1.0 - p_s) / n_s
    return theta_hat, variance


def mixture_log_lr(theta_hat, variance, theta0, tau):
    """log Lambda(theta0): the normal-mixture mSPRT statistic (Johari et al. 2022) against theta = theta0."""
    total = variance + tau**2
    return 0.5 * np.log(variance / total) + tau**2 * (theta_hat - theta0) ** 2 / (2.0 * variance * total)


def always_valid_p(log_lr, previous=1.0):
    """p_t = min(p_{t-1}, 1 / Lambda_t), never above 1: valid at any stopping time (Johari et al. 2022)."""
    return np.minimum(previous, np.minimum(1.0, np.exp(-np.asarray(log_lr, dtype=float))))


def cs_radius(variance, alpha, tau):
    """Half width of the (1 - alpha) normal-mixture confidence sequence (Howard et al. 2021)."""
    total = variance + tau**2
    return np.sqrt(variance * total / tau**2 * (2.0 * np.log(1.0 / alpha) + np.log(total / variance)))


def confidence_sequence(ups_canary, n_canary, ups_stable, n_stable, alpha, tau):
    """(theta_hat, lower, upper): the time-uniform (1 - alpha) bounds on p_canary - p_stable now."""
    theta_hat, variance = difference(ups_canary, n_canary, ups_stable, n_stable)
    radius = cs_radius(variance, alpha, tau)
    return theta_hat, theta_hat - radius, theta_hat + radius
