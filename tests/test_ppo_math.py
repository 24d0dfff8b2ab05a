"""PPO math: hand-written tensors with hand-computed answers, then random tensors checked against independent
reference implementations written plainly here (CleanRL's GAE loop, TRL PPOTrainer's loss formulas)."""

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from rlhf_online.trainer.kl import AdaptiveKLController, FixedKLController, make_kl_controller
from rlhf_online.trainer.ppo import (
    compute_rewards,
    entropy_from_logits,
    gae_advantages,
    kl_estimate,
    last_token_index,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    ppo_loss,
    value_loss,
)

# ---- hand-written tensors --------------------------------------------------------------------------------


def test_logprobs_and_entropy_by_hand():
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])  # (1, 2, 2): p = [1/4, 3/4] then [1/2, 1/2]
    labels = torch.tensor([[1, 0]])
    assert_close(logprobs_from_logits(logits, labels), torch.tensor([[math.log(0.75), math.log(0.5)]]))
    expected_entropy = [-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), math.log(2.0)]
    assert_close(entropy_from_logits(logits), torch.tensor([expected_entropy]))


def test_masked_statistics_ignore_padding():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert masked_mean(values, mask).item() == pytest.approx(2.0)
    assert masked_var(values, mask).item() == pytest.approx(1.0)  # unbiased: ((1)^2 + 0 + 1^2) / 2
    assert_close(masked_whiten(values, mask), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6, rtol=0)
    assert_close(masked_whiten(values, mask, shift_mean=False), torch.tensor([[1.0, 2.0, 3.0, 0.0]]))


def test_kl_estimators_by_hand():
    logprobs = torch.tensor([[math.log(0.5)]])
    ref_logprobs = torch.tensor([[math.log(0.25)]])
    assert kl_estimate(logprobs, ref_logprobs, "k1").item() == pytest.approx(math.log(2.0))
    # k3 = (r - 1) - log r with r = ref / pi = 0.5
    assert kl_estimate(logprobs, ref_logprobs, "k3").item() == pytest.approx(-0.5 + math.log(2.0))
    with pytest.raises(ValueError, match="k1"):
        kl_estimate(logprobs, ref_logprobs, "k2")


def test_rewards_put_the_score_on_the_last_response_token():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    logprobs = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, -5.0]])
    ref_logprobs = torch.tensor([[-2.0, -1.0, -1.5], [-2.0, -3.0, -9.0]])  # k1 = [[1, 0, .5], [0, 1, pad]]
    rewards, kl = compute_rewards(torch.tensor([1.0, 2.0]), logprobs, ref_logprobs, mask, kl_coef=0.1)
    assert_close(kl, torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.0]]))
    assert_close(rewards, torch.tensor([[-0.1, 0.0, -0.05 + 1.0], [0.0, -0.1 + 2.0, 0.0]]))
    assert last_token_index(mask).tolist() == [2, 1]


def test_gae_by_hand():
    # Row 0: gamma 0.9, lambda 0.8, rewards [0, 0, 1], V [0.2, 0.4, 0.6]:
    #   delta = [0.9*0.4 - 0.2, 0.9*0.6 - 0.4, 1 - 0.6] = [0.16, 0.14, 0.4]
    #   A2 = 0.4, A1 = 0.14 + 0.72 * 0.4 = 0.428, A0 = 0.16 + 0.72 * 0.428 = 0.46816
    # Row 1 ends after 2 tokens: the value 9.0 in the padding must not be bootstrapped from.
    #   delta = [0.9*1 - 1, 2 - 1] = [-0.1, 1.0]; A1 = 1.0, A0 = -0.1 + 0.72 = 0.62
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = torch.tensor([[0.2, 0.4, 0.6], [1.0, 1.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, returns = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    assert_close(advantages, torch.tensor([[0.46816, 0.428, 0.4], [0.62, 1.0, 0.0]]))
    assert_close(returns, torch.tensor([[0.66816, 0.828, 1.0], [1.62, 2.0, 0.0]]))


def test_gae_with_lambda_one_is_the_monte_carlo_return_minus_value():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.5, 0.5]])
    advantages, returns = gae_advantages(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert_close(returns, torch.tensor([[1.0, 1.0, 1.0]]))
    assert_close(advantages, torch.tensor([[0.5, 0.5, 0.5]]))


def test_policy_loss_clips_by_hand():
    # ratio 1.5 with A=+1 -> clipped to 1.2; ratio 0.5 with A=-1 -> clipped to 0.8; ratio 0.5 with A=+1 -> not
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 0.5]]))
    advantages = torch.tensor([[1.0, -1.0, 1.0]])
    loss, clip_frac, approx_kl = policy_loss(new, old, advantages, torch.ones(1, 3), clip_range=0.2)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 0.5) / 3)
    assert clip_frac.item() == pytest.approx(2 / 3)
    expected_kl = np.mean([(r - 1) - math.log(r) for r in (1.5, 0.5, 0.5)])
    assert approx_kl.item() == pytest.approx(expected_kl)


def test_policy_gradient_at_ratio_one_is_reinforce():
    # At pi = pi_old the clipped objective's gradient is -A * grad log pi (averaged over tokens).
    logprobs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    advantages = torch.tensor([[2.0, -1.0]])
    loss, _, _ = policy_loss(logprobs, logprobs.detach(), advantages, torch.ones(1, 2), clip_range=0.2)
    loss.backward()
    assert_close(logprobs.grad, -advantages / 2)


def test_value_loss_clips_by_hand():
    values, old_values, returns = (
        torch.tensor([[2.0, 1.1]]),
        torch.tensor([[1.0, 1.0]]),
        torch.tensor([[3.0, 1.0]]),
    )
    # token 0: V=2 clipped to 1.5 -> max((2-3)^2, (1.5-3)^2) = 2.25; token 1: inside the clip -> 0.01
    loss, clip_frac = value_loss(values, old_values, returns, torch.ones(1, 2), clip_range_value=0.5)
    assert loss.item() == pytest.approx(0.5 * (2.25 + 0.01) / 2)
    assert clip_frac.item() == pytest.approx(0.5)


def test_total_loss_combines_the_terms():
    B, T = 2, 3
    g = torch.Generator().manual_seed(0)
    lp, old, adv, ret, v, old_v, ent = (torch.randn(B, T, generator=g) for _ in range(7))
    mask = torch.ones(B, T)
    terms = ppo_loss(lp, v, ent, old, old_v, adv, ret, mask, 0.2, 0.2, vf_coef=0.1, ent_coef=0.01)
    expected = terms.pg_loss + 0.1 * terms.v_loss - 0.01 * ent.mean()
    assert_close(terms.loss, expected)


def test_kl_controllers():
    fixed = FixedKLController(0.1)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.1
    up = AdaptiveKLController(0.1, target=1.0, horizon=100)
    up.update(2.0, 100)  # error clipped to +0.2
    assert up.value == pytest.approx(0.12)
    down = AdaptiveKLController(0.1, target=1.0, horizon=100)
    down.update(0.9, 50)  # error -0.1, half a horizon
    assert down.value == pytest.approx(0.1 * (1 - 0.1 * 0.5))
    assert isinstance(make_kl_controller("adaptive", 0.1, 1.0, 10), AdaptiveKLController)
    with pytest.raises(ValueError, match="fixed"):
        make_kl_controller("pid", 0.1, 1.0, 10)


# ---- random tensors against independent implementations --------------------------------------------------


def random_batch(seed: int, B: int = 6, T: int = 9):
    """Random tensors and a right-padded mask with every row at least one token long."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()  # (B, T)
    return g, lengths, mask


def cleanrl_gae(rewards, values, lengths, gamma, lam):
    """CleanRL ppo.py's backward loop, one episode (row) at a time, in plain Python floats."""
    advantages = np.zeros_like(rewards)
    for row, n in enumerate(lengths):
        lastgaelam = 0.0
        for t in reversed(range(n)):
            if t == n - 1:
                nextnonterminal, nextvalues = 0.0, 0.0
            else:
                nextnonterminal, nextvalues = 1.0, values[row, t + 1]
            delta = rewards[row, t] + gamma * nextvalues * nextnonterminal - values[row, t]
            lastgaelam = delta + gamma * lam * nextnonterminal * lastgaelam
            advantages[row, t] = lastgaelam
    return advantages


@pytest.mark.parametrize("seed", range(5))
def test_gae_matches_cleanrl_loop(seed):
    g, lengths, mask = random_batch(seed)
    rewards = torch.randn(mask.shape, generator=g, dtype=torch.float64) * mask
    values = torch.randn(mask.shape, generator=g, dtype=torch.float64)  # garbage in the padding on purpose
    gamma, lam = 0.99, 0.95
    advantages, returns = gae_advantages(rewards, values, mask.double(), gamma, lam)
    expected = cleanrl_gae(rewards.numpy(), values.numpy(), lengths.tolist(), gamma, lam)
    assert_close(advantages, torch.from_numpy(expected))
    assert_close(returns, (torch.from_numpy(expected) + values) * mask.double())


def trl_masked_whiten(values, mask):
    """TRL utils: mean and Bessel-corrected variance over the mask, (x - mean) * rsqrt(var + 1e-8)."""
    mean = (values * mask).sum() / mask.sum()
    var = (((values - mean) ** 2) * mask).sum() / mask.sum()
    var = var * mask.sum() / (mask.sum() - 1)
    return (values - mean) * torch.rsqrt(var + 1e-8)


@pytest.mark.parametrize("seed", range(3))
def test_whitening_matches_trl_and_numpy(seed):
    g, _, mask = random_batch(seed)
    values = torch.randn(mask.shape, generator=g) * 3 + 1
    ours = masked_whiten(values, mask)
    assert_close(ours, trl_masked_whiten(values, mask) * mask)
    picked = values[mask > 0].numpy()
    assert_close(
        ours[mask > 0], torch.from_numpy((picked - picked.mean()) / picked.std(ddof=1)), atol=1e-5, rtol=0
    )


def trl_losses(new_logprobs, logprobs, advantages, vpred, values, returns, mask, cliprange, cliprange_value):
    """TRL PPOTrainer.train's loss lines, verbatim in spirit."""

    def mm(x):
        return (x * mask).sum() / mask.sum()

    vpredclipped = torch.clamp(vpred, values - cliprange_value, values + cliprange_value)
    vf_losses1 = torch.square(vpred - returns)
    vf_losses2 = torch.square(vpredclipped - returns)
    vf_loss = 0.5 * mm(torch.max(vf_losses1, vf_losses2))
    vf_clipfrac = mm((vf_losses2 > vf_losses1).float())
    ratio = torch.exp(new_logprobs - logprobs)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = mm(torch.max(pg_losses, pg_losses2))
    pg_clipfrac = mm((pg_losses2 > pg_losses).float())
    return pg_loss, pg_clipfrac, vf_loss, vf_clipfrac


@pytest.mark.parametrize("seed", range(5))
def test_losses_match_trl(seed):
    g, _, mask = random_batch(seed)
    logprobs = -torch.rand(mask.shape, generator=g) * 3
    new_logprobs = logprobs + torch.randn(mask.shape, generator=g) * 0.3
    advantages, values, vpred, returns = (torch.randn(mask.shape, generator=g) for _ in range(4))
    pg, pg_cf, v, v_cf = trl_losses(
        new_logprobs, logprobs, advantages, vpred, values, returns, mask, 0.2, 0.3
    )
    ours_pg, ours_cf, _ = policy_loss(new_logprobs, logprobs, advantages, mask, 0.2)
    ours_v, ours_vcf = value_loss(vpred, values, returns, mask, 0.3)
    assert_close(ours_pg, pg)
    assert_close(ours_cf, pg_cf)
    assert_close(ours_v, v)
    assert_close(ours_vcf, v_cf)


@pytest.mark.parametrize("seed", range(3))
def test_rewards_match_trl_loop(seed):
    g, lengths, mask = random_batch(seed)
    logprobs, ref_logprobs = (-torch.rand(mask.shape, generator=g) * 4 for _ in range(2))
    scores = torch.randn(mask.shape[0], generator=g)
    for kind in ("k1", "k3"):
        rewards, _ = compute_rewards(scores, logprobs, ref_logprobs, mask, 0.05, kind)
        for row, n in enumerate(lengths.tolist()):
            logr = ref_logprobs[row, :n] - logprobs[row, :n]
            kl = -logr if kind == "k1" else (logr.exp() - 1) - logr
            expected = -0.05 * kl
            expected[n - 1] += scores[row]
            assert_close(rewards[row, :n], expected)
            assert (rewards[row, n:] == 0).all()


def test_logprobs_and_entropy_match_torch_distributions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g)
    labels = torch.randint(0, 11, (3, 5), generator=g)
    dist = torch.distributions.Categorical(logits=logits)
    assert_close(logprobs_from_logits(logits, labels), dist.log_prob(labels))
    assert_close(entropy_from_logits(logits), dist.entropy())


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_kl_estimators_are_unbiased(kind):
    # Sampling from pi, the mean of k1 and of k3 approaches the exact KL(pi || ref).
    g = torch.Generator().manual_seed(0)
    pi = torch.softmax(torch.randn(20, generator=g), dim=0)
    ref = torch.softmax(torch.randn(20, generator=g), dim=0)
    exact = (pi * (pi / ref).log()).sum().item()
    tokens = torch.multinomial(pi, 200_000, replacement=True, generator=g)
    estimate = kl_estimate(pi.log()[tokens][None], ref.log()[tokens][None], kind).mean().item()
    assert estimate == pytest.approx(exact, rel=0.03)
