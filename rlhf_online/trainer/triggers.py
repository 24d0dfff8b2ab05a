"""When a round runs, and which prompts it trains and evaluates on.

A round runs when (enough new ratings arrived since the last round OR the interval elapsed) AND a reward
checkpoint newer than the one the last round used exists (scoring with the same reward model again would
only chase the same target). Prompts are split by a hash of their text, so a held-out prompt is never trained
on, whatever round it shows up in.
"""

import hashlib
from dataclasses import dataclass


def version_number(version: str | None) -> int:
    """ "v000007" -> 7; None -> 0."""
    return int(version.lstrip("v")) if version else 0


@dataclass(frozen=True)
class RoundTrigger:
    """The trigger rule; `check` is pure, so it is tested without a clock or a broker."""

    min_new_ratings: int  # 0: off
    interval_s: float  # 0: off
    require_new_reward: bool = True

    def check(
        self,
        *,
        new_ratings: int,
        seconds_since_last_round: float,
        reward_version: str | None,
        last_reward_version: str | None,
    ) -> str | None:
        """Why a round should run now (a phrase for the log), or None."""
        if reward_version is None:
            return None
        if self.require_new_reward and version_number(reward_version) <= version_number(last_reward_version):
            return None
        if self.min_new_ratings and new_ratings >= self.min_new_ratings:
            return f"{new_ratings} new ratings (>= {self.min_new_ratings})"
        if self.interval_s and seconds_since_last_round >= self.interval_s:
            return f"{seconds_since_last_round:.0f}s since the last round (>= {self.interval_s:.0f}s)"
        return None


def prompt_hash(prompt: str) -> float:
    """A stable number in [0, 1) for a prompt (sha256, so the same on every machine and run)."""
    return int(hashlib.sha256(prompt.encode()).hexdigest()[:12], 16) / float(1 << 48)


def split_prompts(prompts: list[str], heldout_fraction: float, n_eval: int) -> tuple[list[str], list[str]]:
    """(train, held-out) from a pool of prompts, by hash; held-out is at most `n_eval` distinct prompts.

    Training keeps duplicates (frequent prompts are sampled more often). When the hash puts no prompt in the
    held-out part, the distinct prompt with the smallest hash goes there, so the gate always has something.

    Raises:
        ValueError: fewer than 2 distinct prompts (nothing left to train on once one is held out).
    """
    distinct = sorted(set(prompts), key=prompt_hash)
    if len(distinct) < 2:
        raise ValueError(
            f"need at least 2 distinct prompts to train and evaluate, have {len(distinct)}; wait for more "
            "interactions or pass --prompt-file"
        )
    heldout = [p for p in distinct if prompt_hash(p) < heldout_fraction] or distinct[:1]
    if len(heldout) == len(distinct):
        heldout = heldout[:-1]
    eval_set = set(heldout[:n_eval])
    # every held-out prompt stays out of training, even those beyond n_eval
    excluded = set(heldout)
    train = [p for p in prompts if p not in excluded]
    return train, [p for p in heldout if p in eval_set]
