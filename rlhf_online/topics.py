"""Kafka topic names of the public contract (see docs/design.md), derived from one prefix.

The prefix defaults to "rlhf", giving `rlhf.interactions`, `rlhf.feedback`, `rlhf.models`, `rlhf.rounds`,
`rlhf.canary` and `rlhf.feedback.dlq`; tests use their own prefix so they never see each other's records.
"""

from dataclasses import dataclass

DEFAULT_PREFIX = "rlhf"


@dataclass(frozen=True)
class Topics:
    """The six topic names for one deployment."""

    prefix: str = DEFAULT_PREFIX

    @property
    def interactions(self) -> str:
        return f"{self.prefix}.interactions"

    @property
    def feedback(self) -> str:
        return f"{self.prefix}.feedback"

    @property
    def models(self) -> str:
        return f"{self.prefix}.models"

    @property
    def rounds(self) -> str:
        """One RoundEvent per PPO round, passed or not (docs/design.md)."""
        return f"{self.prefix}.rounds"

    @property
    def canary(self) -> str:
        """One CanaryDecision per canary trial (docs/design.md)."""
        return f"{self.prefix}.canary"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}.feedback.dlq"

    def all(self) -> list[str]:
        return [self.interactions, self.feedback, self.models, self.rounds, self.canary, self.dlq]
