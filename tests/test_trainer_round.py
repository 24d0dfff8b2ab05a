"""PPO rounds on the tiny model with an in-test reward (share of vowels in the answer): a round raises the
held-out reward with bounded KL, publishes a plain checkpoint, its RoundEvent carries the contract's figures,
the gate rejects NaN or regressed policies."""

import json
import math

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_online.contract import RoundFigure, now_ms
from rlhf_online.engine.chat_format import render_prompt
from rlhf_online.engine.tiny_model import TINY_LEARNING_RATE
from rlhf_online.proto.rlhf.v1 import events_pb2
from rlhf_online.registry import Registry
from rlhf_online.trainer import round as round_module
from rlhf_online.trainer.config import TrainerConfig
from rlhf_online.trainer.gate import decide, evaluate_policy
from rlhf_online.trainer.kl import make_kl_controller
from rlhf_online.trainer.policy import (
    VALUE_HEAD_FILE,
    build_policy,
    decoder_layers,
    load_causal_lm,
    load_reference,
    load_value_head,
    non_finite_parameters,
)
from rlhf_online.trainer.publish import RoundRecord, publish_policy, round_event
from rlhf_online.trainer.rollout import (
    encode_prompts,
    response_logprobs,
    response_mask_from_ids,
    sample_responses,
)
from rlhf_online.trainer.round import run_round
from rlhf_online.trainer.triggers import split_prompts

TOPICS = [
    "cats",
    "the sea",
    "bread",
    "music",
    "rain",
    "trains",
    "chess",
    "tea",
    "maps",
    "owls",
    "snow",
    "clocks",
]


def vowel_reward(prompts: list[str], responses: list[str]) -> torch.Tensor:
    """10 x the share of the answer's characters that are vowels: a score a random policy can climb."""
    return torch.tensor([10.0 * sum(c in "aeiou" for c in r) / max(len(r), 1) for r in responses])


def negated_vowel_reward(prompts: list[str], responses: list[str]) -> torch.Tensor:
    return -vowel_reward(prompts, responses)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """On a shared 2-core machine torch's spinning threads slow each other down several times over."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def prompt_split(tokenizer):
    prompts = [
        render_prompt(tokenizer, [("user", f"Tell me about {t}, question {i}.")])
        for t in TOPICS
        for i in range(4)
    ]
    return split_prompts(prompts, heldout_fraction=0.2, n_eval=8)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return load_reference(tiny_model_dir)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tokenizer, prompt_split, reference):
    """One round with the default config and the tiny preset's learning rate (what the demo uses), top 2
    layers trainable."""
    torch.manual_seed(0)
    config = TrainerConfig(learning_rate=TINY_LEARNING_RATE)
    policy = build_policy(
        tiny_model_dir, train_mode=config.train_mode, trainable_layers=config.trainable_layers
    )
    kl_ctl = make_kl_controller(config.kl_controller, config.kl_coef, config.kl_target, config.kl_horizon)
    train, heldout = prompt_split
    result = run_round(policy, reference, tokenizer, vowel_reward, train, heldout, config, kl_ctl, seed=0)
    return config, result


def test_prompt_split_keeps_heldout_prompts_out_of_training(prompt_split):
    train, heldout = prompt_split
    assert heldout and train
    assert not set(heldout) & set(train)


def test_round_raises_heldout_reward_with_bounded_kl(trained):
    config, result = trained
    assert result.decision.passed, result.decision.reason
    assert result.candidate_eval.mean_score > result.serving_eval.mean_score + 0.05
    assert 0.0 < result.candidate_eval.kl_to_reference < config.gate_max_kl
    assert result.serving_eval.kl_to_reference == pytest.approx(0.0, abs=1e-4)  # serving = reference here
    assert non_finite_parameters(result.model) == []
    stats = result.stats
    for key in (
        "ppo_pg_loss",
        "ppo_v_loss",
        "ppo_clip_frac",
        "ppo_approx_kl",
        "kl_per_response",
        "reward_mean",
    ):
        assert torch.isfinite(torch.tensor(stats[key])), key
    assert 0.0 < stats["ppo_clip_frac"] < 1.0
    assert stats["generate_s"] > 0 and stats["train_s"] > 0 and stats["rollouts"] == config.rollouts_per_round


def test_round_figures_use_the_contract_names_and_fill_the_round_event(trained):
    config, result = trained
    figures = result.metrics()
    for name in (
        RoundFigure.REWARD_MEAN, RoundFigure.REWARD_STD, RoundFigure.KL_PER_RESPONSE, RoundFigure.KL_COEF,
        RoundFigure.KL_COEF_NEXT, RoundFigure.GATE_CANDIDATE_SCORE, RoundFigure.GATE_SERVING_SCORE,
        RoundFigure.GATE_IMPROVEMENT, RoundFigure.GATE_KL_TO_REFERENCE, RoundFigure.ROUND_S,
    ):  # fmt: skip
        assert name in figures and math.isfinite(figures[name]), name
    assert figures[RoundFigure.KL_COEF] == config.kl_coef  # the fixed controller keeps beta
    assert figures[RoundFigure.GATE_IMPROVEMENT] == pytest.approx(
        result.candidate_eval.mean_score - result.serving_eval.mean_score
    )
    record = RoundRecord(7, "v000003", "v000002", ratings_applied=120, new_ratings=40)
    record.reference_version, record.published_version = "v000001", "v000004"
    before = now_ms()
    event = round_event(record, events_pb2.PASSED, result=result)
    assert (event.round, event.name, event.outcome) == (7, "round-000007", events_pb2.PASSED)
    assert (event.start_version, event.published_version) == ("v000003", "v000004")
    assert (event.reward_version, event.reference_version) == ("v000002", "v000001")
    assert (event.gate_code, event.gate_reason) == ("passed", result.decision.reason)
    assert event.ratings_applied == 120 and event.metrics["new_ratings"] == 40
    assert event.metrics[RoundFigure.REWARD_MEAN] == pytest.approx(figures[RoundFigure.REWARD_MEAN])
    assert event.metrics[RoundFigure.ROUND_S] == pytest.approx(result.stats[RoundFigure.ROUND_S])
    assert event.timestamp_ms >= before
    failed = round_event(RoundRecord(8, "v000004", "v000002", 120, 0), events_pb2.FAILED, reason="OSError: x")
    assert (failed.gate_code, failed.gate_reason, failed.published_version) == ("error", "OSError: x", "")
    assert failed.metrics[RoundFigure.ROUND_S] >= 0 and RoundFigure.REWARD_MEAN not in failed.metrics


def test_only_the_top_layers_changed(trained, tiny_model_dir):
    config, result = trained
    base = load_causal_lm(tiny_model_dir)
    new_layers, old_layers = decoder_layers(result.model), decoder_layers(base)
    n = len(old_layers)
    for i in range(n):
        same = all(
            torch.equal(a, b)
            for a, b in zip(new_layers[i].parameters(), old_layers[i].parameters(), strict=True)
        )
        assert same == (i < n - config.trainable_layers), f"layer {i}"
    assert torch.equal(result.model.get_input_embeddings().weight, base.get_input_embeddings().weight)


def test_publish_writes_a_plain_checkpoint_with_its_manifest(trained, tokenizer, tmp_path):
    _, result = trained
    registry = Registry(tmp_path / "registry")
    manifest = publish_policy(
        registry,
        result,
        tokenizer,
        parent_version="v000001",
        reward_version="v000003",
        reference_version="v000001",
    )
    folder = registry.verify("policy", manifest.version)
    assert registry.latest("policy") == manifest.version
    assert manifest.parent_version == "v000001"
    assert manifest.extra["reward_version"] == "v000003" and manifest.extra["reference_version"] == "v000001"
    assert manifest.metrics["gate_passed"] == 1.0
    assert manifest.metrics["gate_candidate_score"] == pytest.approx(result.decision.candidate_score)
    json.dumps(manifest.metrics)
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    assert_close(reloaded(ids).logits, result.model(ids).logits)
    head = load_value_head(folder, reloaded.config.hidden_size)
    assert (folder / VALUE_HEAD_FILE).is_file() and head.weight.abs().sum() > 0


def test_gate_rejects_a_regressed_policy(trained, reference, tokenizer, prompt_split):
    # The trained policy says more vowels; under a reward that wants fewer it is worse than the serving one.
    config, result = trained
    kwargs = dict(
        samples_per_prompt=2, max_new_tokens=config.max_new_tokens, temperature=1.0, max_prompt_tokens=192,
        batch_size=64, seed=config.eval_seed,
    )  # fmt: skip
    heldout = prompt_split[1]
    serving = evaluate_policy(reference, reference, tokenizer, negated_vowel_reward, heldout, **kwargs)
    candidate = evaluate_policy(result.model, reference, tokenizer, negated_vowel_reward, heldout, **kwargs)
    decision = decide(candidate, serving, non_finite=[], margin=0.0, max_kl=config.gate_max_kl)
    assert not decision.passed and decision.code == "no_improvement"
    assert decision.improvement < 0


def test_gate_rejects_a_policy_too_far_from_the_reference(trained):
    _, result = trained
    decision = decide(result.candidate_eval, result.serving_eval, non_finite=[], margin=0.0, max_kl=1e-3)
    assert not decision.passed and decision.code == "kl_too_large"


def test_gate_rejects_nan_weights_and_publish_refuses(
    tiny_model_dir, tokenizer, prompt_split, reference, monkeypatch, tmp_path
):
    real_export = round_module.export_model

    def blown_up_export(policy):
        model = real_export(policy)
        with torch.no_grad():
            decoder_layers(model)[-1].mlp.down_proj.weight[0, 0] = float("nan")
        return model

    monkeypatch.setattr(round_module, "export_model", blown_up_export)
    config = TrainerConfig(rollouts_per_round=16, ppo_epochs=1, max_new_tokens=8, eval_prompts=2)
    policy = build_policy(tiny_model_dir, train_mode="top_layers", trainable_layers=1)
    kl_ctl = make_kl_controller("fixed", 0.05, 1.0, 1)
    train, heldout = prompt_split
    result = run_round(policy, reference, tokenizer, vowel_reward, train, heldout[:2], config, kl_ctl, seed=1)
    assert not result.decision.passed and result.decision.code == "non_finite"
    assert "down_proj" in result.decision.reason
    assert result.candidate_eval is None
    registry = Registry(tmp_path / "registry")
    with pytest.raises(ValueError, match="failed the gate"):
        publish_policy(
            registry, result, tokenizer, parent_version="v000001", reward_version="v1", reference_version="v1"
        )
    assert registry.versions("policy") == []


def test_lora_round_merges_adapters_into_plain_weights(
    tiny_model_dir, tokenizer, prompt_split, reference, tmp_path
):
    config = TrainerConfig(
        train_mode="lora",
        rollouts_per_round=16,
        ppo_epochs=1,
        max_new_tokens=16,
        learning_rate=2e-3,
        eval_prompts=2,
    )
    policy = build_policy(
        tiny_model_dir, train_mode="lora", trainable_layers=0, lora_target_modules=config.lora_targets
    )
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("value_head") for n in trainable)
    kl_ctl = make_kl_controller("fixed", 0.05, 1.0, 1)
    train, heldout = prompt_split
    result = run_round(policy, reference, tokenizer, vowel_reward, train, heldout[:2], config, kl_ctl, seed=2)
    model = result.model
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not any("lora" in name for name, _ in model.named_parameters())
    base = load_causal_lm(tiny_model_dir)
    q_new, q_old = (
        decoder_layers(model)[0].self_attn.q_proj.weight,
        decoder_layers(base)[0].self_attn.q_proj.weight,
    )
    assert not torch.equal(q_new, q_old)  # the adapters were merged into the attention weights
    mlp_new, mlp_old = decoder_layers(model)[0].mlp.up_proj.weight, decoder_layers(base)[0].mlp.up_proj.weight
    assert torch.equal(mlp_new, mlp_old)  # modules without adapters are untouched
    model.save_pretrained(tmp_path / "merged", safe_serialization=True)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = torch.tensor([[1, 40, 41, 42]])
    assert_close(reloaded(ids).logits, model(ids).logits)


def test_recomputed_logprobs_match_the_sampling_distribution(tiny_model_dir, tokenizer):
    # Left-padded prompts of different lengths: the forward pass must see the same positions as generate.
    lm = load_causal_lm(tiny_model_dir).eval()
    prompts = [
        render_prompt(tokenizer, [("user", text)]) for text in ("hi", "a much longer question, about owls")
    ]
    rollouts = sample_responses(
        lm, tokenizer, prompts, max_new_tokens=10, temperature=0.7, max_prompt_tokens=64, seed=5
    )
    query_ids, query_mask = encode_prompts(tokenizer, prompts, 64)
    torch.manual_seed(5)
    out = lm.generate(
        input_ids=query_ids, attention_mask=query_mask, do_sample=True, temperature=0.7, top_k=0, top_p=1.0,
        max_new_tokens=10, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    sampled = out.sequences[:, query_ids.shape[1] :]
    mask = rollouts.response_mask
    assert torch.equal(sampled * mask.long(), rollouts.response_ids * mask.long())
    logits = torch.stack(out.logits, dim=1) / 0.7  # (B, T, V) raw logits at each step
    expected = torch.log_softmax(logits, dim=-1).gather(2, sampled.unsqueeze(-1)).squeeze(-1) * mask
    assert_close(response_logprobs(lm, rollouts, 0.7, batch_size=1), expected, atol=1e-4, rtol=1e-4)
    assert rollouts.responses[0] == tokenizer.decode(
        rollouts.response_ids[0][mask[0] > 0], skip_special_tokens=True
    )


def test_response_mask_stops_after_the_first_eos():
    eos = 2
    ids = torch.tensor([[5, 6, 2, 7, 2], [5, 5, 5, 5, 5], [2, 9, 9, 9, 9]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float)
    assert torch.equal(response_mask_from_ids(ids, eos), expected)
