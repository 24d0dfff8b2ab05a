"""The frozen trunk kept for PPO steps (trainer.trunk) and the gate's answers kept between rounds.

The trunk is a speed-up only: a step on the kept trunk must give the same log-probs, values and updates as
a step through the whole model, and a model whose forward does not take it falls back to the whole model.
"""

import copy
import logging

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from rlhf_online.engine.chat_format import render_prompt
from rlhf_online.engine.tiny_model import TINY_LEARNING_RATE
from rlhf_online.trainer.config import TrainerConfig
from rlhf_online.trainer.gate import EvalResult
from rlhf_online.trainer.kl import make_kl_controller
from rlhf_online.trainer.policy import build_policy, load_reference, trainable_policy
from rlhf_online.trainer.rollout import (
    logprobs_with_reference,
    policy_outputs,
    response_logprobs,
    sample_rollouts,
)
from rlhf_online.trainer.round import RoundSetup, make_experience, run_round, train
from rlhf_online.trainer.service import GateAnswers
from rlhf_online.trainer.trunk import common_trunk, decoder_layers
from tests.test_trainer_kafka import one_torch_thread  # noqa: F401 (an autouse fixture)

CONFIG = TrainerConfig(
    learning_rate=TINY_LEARNING_RATE, rollouts_per_round=12, minibatch_size=4, ppo_epochs=2
)


def vowels(prompts: list[str], responses: list[str]) -> torch.Tensor:
    return torch.tensor([10.0 * sum(c in "aeiou" for c in r) / max(len(r), 1) for r in responses])  # (B,)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [render_prompt(tokenizer, [("user", f"Tell me about topic {i}.")]) for i in range(12)]


def experience(policy, reference, tokenizer, prompts):
    rollouts = sample_rollouts(
        policy.lm, tokenizer, prompts, max_new_tokens=16, temperature=1.0, max_prompt_tokens=64,
        batch_size=12, seed=0,
    )  # fmt: skip
    return make_experience(policy, reference, rollouts, vowels(prompts, rollouts.responses), CONFIG, 0.05)


def setup_for(policy, reference, tokenizer, prompts):
    return RoundSetup(policy, reference, tokenizer, vowels, prompts[:2], CONFIG, "test", lambda: False)


def test_the_top_blocks_on_the_kept_trunk_give_the_whole_models_outputs(tiny_model_dir, tokenizer, prompts):
    policy = build_policy(tiny_model_dir, train_mode="top_layers", trainable_layers=2)
    exp = experience(policy, load_reference(tiny_model_dir), tokenizer, prompts)
    rollouts = exp.rollouts
    assert policy.trunk_split == 2  # the tiny preset has 4 blocks
    assert exp.trunk.shape == (*rollouts.input_ids.shape, policy.lm.config.hidden_size)
    with torch.no_grad():
        whole = policy_outputs(policy, rollouts, 1.0)
        kept = policy_outputs(policy, rollouts, 1.0, exp.trunk)
    mask = rollouts.response_mask
    for a, b in zip(whole, kept, strict=True):
        assert_close(a * mask, b * mask, atol=1e-5, rtol=1e-5)


def test_ppo_steps_on_the_kept_trunk_update_the_weights_as_the_whole_model_does(
    tiny_model_dir, tokenizer, prompts
):
    reference = load_reference(tiny_model_dir)
    with_trunk = build_policy(tiny_model_dir, train_mode="top_layers", trainable_layers=2)
    without = copy.deepcopy(with_trunk)
    exp = experience(with_trunk, reference, tokenizer, prompts)
    exp_whole = copy.copy(exp)
    exp_whole.trunk = None
    initial = {name: p.detach().clone() for name, p in with_trunk.named_parameters()}
    train(setup_for(with_trunk, reference, tokenizer, prompts), exp, seed=0)
    train(setup_for(without, reference, tokenizer, prompts), exp_whole, seed=0)
    assert exp.trunk is not None  # the check passed, the steps used it
    moved = 0.0
    for (name, a), b in zip(with_trunk.named_parameters(), without.parameters(), strict=True):
        assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
        moved = max(moved, (a - initial[name]).abs().max().item())
    assert moved > 1e-4  # they did train


def test_a_model_that_does_not_take_the_trunk_trains_on_the_whole_model(tokenizer, prompts, caplog):
    """GPT-2 adds its position embeddings to `inputs_embeds`: the kept trunk would be shifted, and the
    check before the first update sees it."""
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=3, n_head=2)
    )
    reference = copy.deepcopy(gpt2).eval().requires_grad_(False)
    policy = trainable_policy(gpt2, torch.nn.Linear(32, 1), train_mode="top_layers", trainable_layers=1)
    with caplog.at_level(logging.WARNING):
        exp = experience(policy, reference, tokenizer, prompts)
    assert exp.trunk is None
    assert "PPO steps run the whole model" in caplog.text
    stats = train(setup_for(policy, reference, tokenizer, prompts), exp, seed=0)
    assert torch.isfinite(torch.tensor(stats["pg_loss"]))


def test_the_reference_runs_only_its_own_top_blocks_on_the_trunk_it_shares(
    tiny_model_dir, tokenizer, prompts
):
    """The reference and a policy trained in top_layers mode share their bottom blocks: the reference's
    log-probs from the kept trunk equal its whole forward's, and a changed bottom block is seen."""
    reference = load_reference(tiny_model_dir)
    policy = build_policy(tiny_model_dir, train_mode="top_layers", trainable_layers=2)
    with torch.no_grad():
        decoder_layers(policy.lm)[3].mlp.down_proj.weight.mul_(1.5)  # a trained top block
    assert common_trunk(policy.lm, reference) == 3
    exp = experience(policy, reference, tokenizer, prompts)
    whole = response_logprobs(reference, exp.rollouts, 1.0, 4)
    assert_close(exp.ref_logprobs, whole, atol=1e-5, rtol=1e-5)
    logprobs, ref_logprobs = logprobs_with_reference(policy.lm, reference, exp.rollouts, 1.0, 4)
    assert_close(ref_logprobs, whole, atol=1e-5, rtol=1e-5)
    assert_close(logprobs, response_logprobs(policy.lm, exp.rollouts, 1.0, 4), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        decoder_layers(policy.lm)[0].mlp.down_proj.weight.mul_(1.5)  # not the reference's bottom any more
    assert common_trunk(policy.lm, reference) == 0


def test_a_round_rescores_the_serving_versions_earlier_answers(tiny_model_dir, tokenizer, prompts):
    config = TrainerConfig(
        learning_rate=TINY_LEARNING_RATE, rollouts_per_round=8, minibatch_size=4, ppo_epochs=1,
        eval_prompts=2, eval_samples_per_prompt=2, max_new_tokens=8,
    )  # fmt: skip
    reference = load_reference(tiny_model_dir)
    kl_ctl = make_kl_controller("fixed", 0.05, 6.0, 10000)

    def round_on(reward_fn, earlier=None):
        policy = build_policy(tiny_model_dir, train_mode="top_layers", trainable_layers=2)
        return run_round(
            policy, reference, tokenizer, reward_fn, prompts[2:], prompts[:2], config, kl_ctl, seed=1,
            serving_answers=earlier,
        )  # fmt: skip

    first = round_on(vowels)
    second = round_on(lambda p, r: -vowels(p, r), earlier=first.serving_eval)
    assert second.serving_eval.responses == first.serving_eval.responses  # not sampled again
    assert second.serving_eval.generate_s == 0.0
    assert second.serving_eval.mean_score == pytest.approx(-first.serving_eval.mean_score)  # re-scored
    assert second.stats["eval_generate_s"] == pytest.approx(second.candidate_eval.generate_s)


def answers(tag: str) -> EvalResult:
    return EvalResult(0.0, 0.0, 1.0, 1, prompts=[tag], responses=[tag])


def test_gate_answers_are_kept_per_version_and_only_for_the_same_heldout_prompts():
    kept = GateAnswers(keep=2)
    kept.put("v000001", ["a", "b"], answers("one"))
    kept.put("v000002", ["a", "b"], answers("two"))
    kept.put(None, ["a", "b"], answers("nothing published"))
    assert kept.get("v000001", ["a", "b"]).responses == ["one"]
    assert kept.get("v000001", ["a", "c"]) is None  # other held-out prompts: sample again
    kept.put("v000003", ["a", "b"], answers("three"))
    assert kept.get("v000001", ["a", "b"]) is None  # the oldest went
    assert kept.get("v000003", ["a", "b"]).responses == ["three"]
