"""The live canary through the loop: the inference service, the trainer and users rating real answers, on the
real broker (docs/design.md, "Canary trials").

Users (each with a user id, so each stays on one version) chat over gRPC and rate every answer with a
hidden judge (`contains`: a "?" in the answer, 30-35% of the tiny base model's answers). The trainer runs
one PPO round against a reward signal the test chooses, its gate passes the candidate, and the candidate
serves half the traffic as a canary until the users' thumbs decide:

- an honest reward (the judge itself): the candidate has more "?", the users like it, it is promoted;
- reward hacking: a reward model that rewards what the users dislike (the judge inverted, as a reward
  model exploited by PPO would). The trainer's own gate, which scores with that same reward model, passes
  the candidate; the users' thumbs roll it back, with no call of Rollback, and every replica goes back to
  serving the stable version alone.
"""

import asyncio
import random

import grpc
import pytest
import torch

from rlhf_online.broker.clients import read_topic
from rlhf_online.contract import POLICY
from rlhf_online.engine.tiny_model import TINY_LEARNING_RATE
from rlhf_online.proto.rlhf.v1 import chat_pb2, chat_pb2_grpc, events_pb2
from rlhf_online.sim.judges import load_judge
from rlhf_online.sim.simulate import load_prompts
from rlhf_online.trainer.config import TrainerConfig
from rlhf_online.trainer.service import create_service
from tests.test_hot_swap import served, wait_for  # noqa: F401 (served is a fixture)
from tests.test_trainer_kafka import announce_reward_checkpoint, model_events, round_events

pytestmark = pytest.mark.kafka

JUDGE = load_judge("contains")
USERS = [f"user-{i}" for i in range(64)]
ANSWER_TOKENS = 32


def judge_reward(sign: float):
    """A reward model that is the judge itself (sign +1) or the judge inverted (sign -1)."""

    def reward_fn(prompts: list[str], responses: list[str]) -> torch.Tensor:
        liked = [JUDGE(p, r) for p, r in zip(prompts, responses, strict=True)]
        return sign * (4.0 * torch.tensor(liked, dtype=torch.float32) - 2.0)  # (B,)

    return lambda _path, _device: reward_fn


class Users:
    """Simulated users: chat, judge the answer, rate it; thumbs and answers counted per serving version."""

    def __init__(self, channel: grpc.aio.Channel, seed: int = 0) -> None:
        self.stub = chat_pb2_grpc.ChatServiceStub(channel)
        self.prompts, self.rng = load_prompts(), random.Random(seed)
        self.ups: dict[str, list[bool]] = {}

    async def run(self, until, workers: int = 6) -> None:
        """Rates answers until `until()` holds."""

        async def worker() -> None:
            while not until():
                await self.one()

        await asyncio.gather(*(worker() for _ in range(workers)))

    async def one(self) -> None:
        user, prompt = self.rng.choice(USERS), self.rng.choice(self.prompts)
        request = chat_pb2.ChatRequest(
            messages=[chat_pb2.Message(role="user", content=prompt)], user_id=user,
            params=chat_pb2.GenerationParams(max_new_tokens=ANSWER_TOKENS),
        )  # fmt: skip
        answer = await self.stub.Chat(request, timeout=60)
        liked = JUDGE(prompt, answer.text)
        rating = chat_pb2.THUMBS_UP if liked else chat_pb2.THUMBS_DOWN
        await self.stub.SubmitFeedback(
            chat_pb2.FeedbackRequest(response_id=answer.response_id, user_id=user, rating=rating), timeout=30
        )
        self.ups.setdefault(answer.model_version, []).append(liked)

    def rate(self, version: str) -> float:
        votes = self.ups.get(version, [])
        return sum(votes) / max(1, len(votes))


def start_trainer(kafka_bootstrap, topics, registry, reward_loader):
    """A trainer whose passed versions first serve half the traffic; one default-sized PPO round."""
    config = TrainerConfig(
        kafka_bootstrap=kafka_bootstrap, topic_prefix=topics.prefix, registry_dir=str(registry.root),
        grpc_port=0, learning_rate=TINY_LEARNING_RATE, min_new_ratings=40, round_interval_s=0,
        poll_interval_s=0.2, seed=0,
        max_new_tokens=ANSWER_TOKENS, eval_prompts=16, eval_samples_per_prompt=4,
        canary_share=0.5, canary_min_ratings=30, canary_margin=0.05, canary_max_ratings=600,
    )  # fmt: skip
    service = create_service(config, reward_loader=reward_loader)
    service.start()
    return service


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("sign", "outcome"),
    [(1.0, events_pb2.CANARY_PROMOTED), (-1.0, events_pb2.CANARY_ROLLED_BACK)],
    ids=["honest-reward-is-promoted", "hacked-reward-passes-the-gate-and-is-rolled-back"],
)
async def test_the_users_thumbs_decide_what_the_reward_model_passed(
    served,  # noqa: F811
    kafka_bootstrap,
    topics,
    tiny_model_dir,
    sign,
    outcome,
):
    running, channel, registry = served
    users = Users(channel)
    await users.run(until=lambda: len(users.ups.get("v000001", [])) >= 80)  # prompts for the trainer's pool
    base_rate = users.rate("v000001")
    service = start_trainer(kafka_bootstrap, topics, registry, judge_reward(sign))
    try:
        announce_reward_checkpoint(kafka_bootstrap, topics, registry, tiny_model_dir, 80)
        await wait_for(lambda: service.trial_running or service.rounds_run, 300, "a passed round")
        assert service.trial_running, "the gate rejected the round"
        await wait_for(lambda: running.engine.canary is not None, 60, "the canary to be served")
        canary = service.last_published
        assert registry.latest(POLICY) == "v000001"
        await users.run(until=lambda: bool(service.canary.decisions))
    finally:
        service.stop()

    (decision,) = service.canary.decisions
    (record,) = read_topic(kafka_bootstrap, topics.canary, min_records=1)
    event = events_pb2.CanaryDecision.FromString(record.value)
    assert (event.canary_version, event.stable_version, event.outcome) == (canary, "v000001", outcome)
    promoted = outcome == events_pb2.CANARY_PROMOTED
    # the users' own view agrees with the trial's: the canary's answers meet the judge more (or less) often
    assert (users.rate(canary) > base_rate + 0.1) if promoted else (users.rate(canary) < base_rate - 0.1)
    (passed,) = [e for e in round_events(kafka_bootstrap, topics) if e.published_version == canary]
    assert passed.outcome == events_pb2.PASSED  # the trainer's own gate let it through
    final = "v000002" if promoted else "v000001"
    assert registry.latest(POLICY) == final
    await wait_for(lambda: running.engine.canary is None and running.engine.version == final, 60, "the plan")
    actions = [(e.action, e.version) for e in model_events(kafka_bootstrap, topics, events_pb2.POLICY)]
    assert actions == [
        (events_pb2.CANARY, canary),
        (events_pb2.PROMOTED, canary) if promoted else (events_pb2.ROLLED_BACK, "v000001"),
    ]
    after = Users(channel, seed=1)
    await after.run(until=lambda: sum(map(len, after.ups.values())) >= 16)
    assert set(after.ups) == {final}  # every user, on either arm before, is served the decided version
    print(
        f"\n[canary loop] base {base_rate:.2f} ({len(users.ups['v000001'])} ratings), canary {canary} "
        f"{users.rate(canary):.2f} ({len(users.ups.get(canary, []))}): {decision.code}; {decision.reason}"
    )
