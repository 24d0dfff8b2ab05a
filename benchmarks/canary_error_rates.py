"""Error rates of the canary's sequential test from many simulated trials, without services (numpy, seeded).

Each trial streams Bernoulli thumbs in a random interleaving of the arms (a rating is on the canary with
probability --shares) and is checked after every rating with the live trial's rules (rlhf_online.canary):

    .venv/bin/python benchmarks/canary_error_rates.py                     # the defaults, about a minute
    .venv/bin/python benchmarks/canary_error_rates.py --alpha 0.1 --margin 0.1 --trials 2000

Per canary share and true effect (canary rate - stable rate) it prints a markdown table: the share of trials
promoted, rolled back (significantly worse) and timed out, the share of wrong decisions with its 95% Wilson
interval (a promotion when the canary is worse by the margin or more; a significant rollback when it is equal
or better; none in between, where either is acceptable), and the median ratings to a decision (canary arm,
both arms; time-outs count at their length). It exits with status 1 when a wrong-decision rate is above alpha
beyond Monte Carlo error (its interval lies above alpha).
"""

import argparse
import math
import time
from dataclasses import dataclass

import numpy as np

from rlhf_online.canary.decision import INFERIOR, NON_INFERIOR, PROMOTE, TIMED_OUT_RATINGS, CanaryConfig
from rlhf_online.canary.simulate import Outcomes, simulate_trials

CHUNK = 2000  # trials simulated at once (bounds memory to a few hundred MB)


@dataclass
class Row:
    share: float
    effect: float
    outcomes: Outcomes
    wrong: float | None  # share of wrong decisions, None in the indifference zone
    interval: tuple[float, float] | None


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial share k / n."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def wrong_decisions(config: CanaryConfig, effect: float, o: Outcomes) -> np.ndarray | None:
    """(N,) bool: trials that decided wrongly at this effect; None between -margin and 0 (both acceptable)."""
    timeout_promotes = config.timeout_outcome == PROMOTE
    if effect <= -config.margin:
        return (o.code == NON_INFERIOR) | (timeout_promotes & (o.code == TIMED_OUT_RATINGS))
    if effect >= 0.0:
        return o.code == INFERIOR
    return None


def run_cell(config: CanaryConfig, base: float, effect: float, share: float, trials: int, rng) -> Row:
    """All trials of one (share, effect) cell, CHUNK at a time."""
    parts = [
        simulate_trials(config, base, base + effect, share, min(CHUNK, trials - i), rng, block=256)
        for i in range(0, trials, CHUNK)
    ]
    o = Outcomes(
        *(np.concatenate([getattr(p, f) for p in parts]) for f in ("code", "canary_ratings", "ratings"))
    )
    wrong = wrong_decisions(config, effect, o)
    if wrong is None:
        return Row(share, effect, o, None, None)
    return Row(share, effect, o, float(wrong.mean()), wilson(int(wrong.sum()), trials))


def table(rows: list[Row], config: CanaryConfig) -> str:
    """The markdown table of the module docstring."""
    lines = [
        "| canary share | effect | promoted | rolled back | timed out | wrong decisions (95% CI) | "
        "median canary ratings | median ratings |",
        "| ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for r in rows:
        c = r.outcomes.code
        shares = [f"{np.mean(c == code):.1%}" for code in (NON_INFERIOR, INFERIOR, TIMED_OUT_RATINGS)]
        wrong = "(either is fine)"
        if r.wrong is not None:
            kind = "promotions" if r.effect <= -config.margin else "rollbacks"
            wrong = f"{r.wrong:.2%} [{r.interval[0]:.2%}, {r.interval[1]:.2%}] {kind}"
        lines.append(
            f"| {r.share:.0%} | {r.effect:+.2f} | {' | '.join(shares)} | {wrong} | "
            f"{np.median(r.outcomes.canary_ratings):.0f} | {np.median(r.outcomes.ratings):.0f} |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    d = CanaryConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=10000, help="Simulated trials per (share, effect) cell.")
    p.add_argument("--base-rate", type=float, default=0.3, help="Thumbs-up rate of the stable version.")
    p.add_argument("--effects", default="-0.10,-0.05,0,0.05,0.10,0.20", help="Canary minus stable rates.")
    p.add_argument("--shares", default="0.1,0.5", help="Shares of the ratings on the canary arm.")
    p.add_argument("--alpha", type=float, default=d.alpha, help="Significance level.")
    p.add_argument("--margin", type=float, default=d.margin, help="Non-inferiority margin.")
    p.add_argument("--tau", type=float, default=d.tau, help="Mixture spread of the mSPRT.")
    p.add_argument("--min-ratings", type=int, default=d.min_ratings_per_arm, help="Minimum ratings per arm.")
    p.add_argument("--max-canary-ratings", type=int, default=d.max_canary_ratings, help="Time-out length.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the whole run.")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    config = CanaryConfig(
        alpha=args.alpha,
        margin=args.margin,
        tau=args.tau,
        min_ratings_per_arm=args.min_ratings,
        max_canary_ratings=args.max_canary_ratings,
    )
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    rows = [
        run_cell(config, args.base_rate, float(effect), float(share), args.trials, rng)
        for share in args.shares.split(",")
        for effect in args.effects.split(",")
    ]
    elapsed = time.perf_counter() - start
    print(
        f"base rate {args.base_rate}, alpha {config.alpha}, margin {config.margin}, tau {config.tau}, "
        f"min {config.min_ratings_per_arm} ratings per arm, time-out at {config.max_canary_ratings} canary "
        f"ratings ({config.timeout_outcome}), {args.trials} trials per row, seed {args.seed}\n"
    )
    print(table(rows, config))
    print(f"\n{len(rows) * args.trials} trials in {elapsed:.1f} s")
    above = [r for r in rows if r.interval is not None and r.interval[0] > config.alpha]
    for r in above:
        print(f"wrong decisions above alpha at share {r.share}, effect {r.effect:+.2f}: {r.wrong:.2%}")
    return 1 if above else 0


if __name__ == "__main__":
    raise SystemExit(main())
