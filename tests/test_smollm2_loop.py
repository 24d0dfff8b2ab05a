"""SmolLM2-135M-Instruct through the whole loop, on the real broker: served, rated by users, a reward
checkpoint learnt from those ratings, one PPO round, its gate decision, a hot swap, the new version's
answers served. The learning itself is measured by `benchmarks/learning_suite.py --preset real`; this is
the smoke test that every part runs on a real model (rounds sized small: minutes on two CPU cores).

    .venv/bin/pytest -q -s -m real_model tests/test_smollm2_loop.py
"""

import asyncio
import random

import grpc
import pytest

from rlhf_online.broker.clients import read_topic
from rlhf_online.contract import POLICY, RoundFigure
from rlhf_online.inference.server import create_server
from rlhf_online.proto.rlhf.v1 import chat_pb2, chat_pb2_grpc, events_pb2
from rlhf_online.registry import Registry
from rlhf_online.reward.config import RewardConfig
from rlhf_online.reward.service import create_service as create_reward_service
from rlhf_online.sim.judges import load_judge
from rlhf_online.sim.simulate import load_prompts
from rlhf_online.trainer.config import TrainerConfig
from rlhf_online.trainer.service import create_service as create_trainer_service
from tests.test_hot_swap import wait_for
from tests.test_inference_server import config_for
from tests.test_smollm2 import CAPITAL, smollm2_dir  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.real_model, pytest.mark.kafka]

RATINGS = 24
ANSWER_TOKENS = 24


def shared(kafka_bootstrap, topics, registry_dir) -> dict:
    return dict(
        kafka_bootstrap=kafka_bootstrap, topic_prefix=topics.prefix, registry_dir=str(registry_dir),
        grpc_port=0, metrics_port=-1, device="cpu", torch_threads=1,
    )  # fmt: skip


def reward_config(kafka_bootstrap, topics, registry_dir, model_dir) -> RewardConfig:
    """The demo's reward model for real models (the bottom 2 blocks), checkpointed after every 8 ratings."""
    return RewardConfig(
        **shared(kafka_bootstrap, topics, registry_dir), base_model_dir=str(model_dir), backbone_layers=2,
        trainable_layers=2, max_length=128, update_every_examples=8, update_interval_s=0.5,
        checkpoint_every_updates=1, eval_every_updates=1, heldout_fraction=0.2,
    )  # fmt: skip


def trainer_config(kafka_bootstrap, topics, registry_dir) -> TrainerConfig:
    """One small round: 8 rollouts of 16 tokens, one epoch, the top block; every candidate passes the gate
    (the decision itself is what is checked, not its verdict)."""
    return TrainerConfig(
        **shared(kafka_bootstrap, topics, registry_dir), min_new_ratings=8, round_interval_s=0,
        poll_interval_s=0.2, rollouts_per_round=8, generation_batch_size=8, minibatch_size=8, ppo_epochs=1,
        max_new_tokens=16, trainable_layers=1, eval_prompts=2, eval_samples_per_prompt=1,
        gate_margin=-1e6, seed=0,
    )  # fmt: skip


async def greedy(stub, text: str) -> chat_pb2.ChatResponse:
    request = chat_pb2.ChatRequest(
        messages=[chat_pb2.Message(role="user", content=text)], user_id="alice",
        params=chat_pb2.GenerationParams(max_new_tokens=32, temperature=0),
    )  # fmt: skip
    return await stub.Chat(request, timeout=300)


async def rate_answers(stub, n: int) -> None:
    """n users ask one of the simulator's prompts each and rate the answer by a real-text judge."""
    judge, prompts, rng = load_judge("addresses_user"), load_prompts(), random.Random(0)

    async def one(i: int) -> None:
        prompt = rng.choice(prompts)
        request = chat_pb2.ChatRequest(
            messages=[chat_pb2.Message(role="user", content=prompt)], user_id=f"user-{i}",
            params=chat_pb2.GenerationParams(max_new_tokens=ANSWER_TOKENS),
        )  # fmt: skip
        answer = await stub.Chat(request, timeout=300)
        rating = chat_pb2.THUMBS_UP if judge(prompt, answer.text) else chat_pb2.THUMBS_DOWN
        feedback = chat_pb2.FeedbackRequest(response_id=answer.response_id, user_id=f"user-{i}")
        feedback.rating = rating
        await stub.SubmitFeedback(feedback, timeout=60)

    for start in range(0, n, 8):  # 8 at a time: one batch of the engine
        await asyncio.gather(*(one(i) for i in range(start, min(n, start + 8))))


@pytest.mark.timeout(1200)
async def test_a_round_on_smollm2_is_gated_swapped_in_and_served(
    smollm2_dir,  # noqa: F811
    kafka_bootstrap,
    topics,
    tmp_path,
):
    config = config_for(kafka_bootstrap, topics, smollm2_dir, tmp_path, default_max_new_tokens=ANSWER_TOKENS)
    running = await create_server(config)  # registers the base model as v000001
    registry = Registry(config.registry_dir)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    stub = chat_pb2_grpc.ChatServiceStub(channel)
    reward = create_reward_service(reward_config(kafka_bootstrap, topics, config.registry_dir, smollm2_dir))
    trainer = create_trainer_service(trainer_config(kafka_bootstrap, topics, config.registry_dir))
    try:
        before = await greedy(stub, CAPITAL)
        assert before.model_version == "v000001" and "Paris" in before.text
        await asyncio.to_thread(reward.start)
        await asyncio.to_thread(trainer.start)
        await rate_answers(stub, RATINGS)
        await wait_for(lambda: trainer.rounds_run or trainer.rounds_failed, 900, "a PPO round")
        assert trainer.rounds_failed == 0 and trainer.versions_published == 1
        await wait_for(lambda: running.engine.version == "v000002", 300, "the hot swap")
        after = await greedy(stub, CAPITAL)
    finally:
        await asyncio.to_thread(trainer.stop)
        await asyncio.to_thread(reward.stop)
        await channel.close()
        await running.stop(grace_s=1)

    assert reward.checkpoints_published >= 1
    assert after.model_version == "v000002" and registry.latest(POLICY) == "v000002"
    assert "Paris" in after.text, after.text  # one small round leaves the model's knowledge in place
    rounds = [
        events_pb2.RoundEvent.FromString(r.value)
        for r in read_topic(kafka_bootstrap, topics.rounds, min_records=1)
    ]
    (event,) = [e for e in rounds if e.published_version == "v000002"]  # a later round may have begun
    assert (event.outcome, event.gate_code) == (events_pb2.PASSED, "passed")
    assert event.published_version == "v000002"
    figures = event.metrics
    assert figures[RoundFigure.GATE_CANDIDATE_SCORE] == pytest.approx(
        figures[RoundFigure.GATE_SERVING_SCORE] + figures[RoundFigure.GATE_IMPROVEMENT]
    )
    stages = [
        f"{k} {v:.1f}s"
        for k, v in sorted(figures.items())
        if k.endswith("_s") and k not in ("round_s", "rollouts_per_s")
    ]
    kl = figures[RoundFigure.KL_PER_RESPONSE]
    print(f"\n[smollm2 loop] round {figures[RoundFigure.ROUND_S]:.1f}s: {', '.join(stages)}; KL {kl:.4f}")
    print(f"[smollm2 loop] answer of v000002: {after.text!r}")
