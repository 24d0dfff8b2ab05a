"""Reward losses and held-out figures on hand-written tensors."""

import math

import pytest
import torch
from torch.testing import assert_close

from rlhf_online.reward import losses


def test_pointwise_logistic_loss_matches_hand_computation():
    scores = torch.tensor([0.0, 2.0, -1.0])
    labels = torch.tensor([1.0, 0.0, 0.0])
    # BCE(0, 1) = log 2; BCE(2, 0) = log(1 + e^2); BCE(-1, 0) = log(1 + e^-1)
    per = [math.log(2), math.log(1 + math.e**2), math.log(1 + math.e**-1)]
    assert_close(losses.pointwise_logistic_loss(scores, labels), torch.tensor(sum(per) / 3))
    # w_up = 3, w_down = 1: (3 * per[0] + per[1] + per[2]) / 5
    weighted = losses.pointwise_logistic_loss(scores, labels, w_up=3.0, w_down=1.0)
    assert_close(weighted, torch.tensor((3 * per[0] + per[1] + per[2]) / 5))


def test_class_weights_balance_a_skewed_ratio():
    w_up, w_down = losses.class_weights(n_up=90, n_down=10)
    assert w_up == pytest.approx(100 / 180) and w_down == pytest.approx(100 / 20)
    assert 90 * w_up == pytest.approx(10 * w_down)  # both classes carry the same total weight
    assert losses.class_weights(0, 0) == (1.0, 1.0)
    assert losses.class_weights(5, 0) == (1.0, 1.0)


def test_class_weighting_removes_majority_bias():
    # A constant score on a 9:1 stream: the unweighted optimum is logit(0.9), the weighted one 0.
    labels = torch.tensor([1.0] * 9 + [0.0])
    w_up, w_down = losses.class_weights(9, 1)
    s = torch.zeros((), requires_grad=True)
    opt = torch.optim.SGD([s], lr=1.0)
    for _ in range(300):
        opt.zero_grad()
        losses.pointwise_logistic_loss(s.expand(10), labels, w_up, w_down).backward()
        opt.step()
    assert abs(s.item()) < 1e-3


def test_bradley_terry_loss():
    chosen = torch.tensor([1.0, 0.0])
    rejected = torch.tensor([0.0, 0.0])
    expected = (math.log(1 + math.e**-1) + math.log(2)) / 2  # -log sigmoid(1), -log sigmoid(0)
    assert_close(losses.bradley_terry_loss(chosen, rejected), torch.tensor(expected))
    # Only the difference matters.
    assert_close(losses.bradley_terry_loss(chosen + 5, rejected + 5), torch.tensor(expected))


def test_preference_pairs_only_same_prompt_opposite_labels():
    prompts = ["a", "a", "b", "a", "b", "c"]
    labels = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert losses.preference_pairs(prompts, labels) == [(0, 1), (0, 3)]
    assert losses.preference_pairs(["a"] * 6, [1.0, 1.0, 1.0, 0.0, 0.0, 0.0], max_per_prompt=2) == [
        (0, 3),
        (0, 4),
    ]


def test_reward_loss_adds_pairwise_term():
    scores = torch.tensor([2.0, -1.0, 0.5])
    labels = torch.tensor([1.0, 0.0, 1.0])
    loss, parts = losses.reward_loss(scores, labels, [(0, 1)], pairwise_coef=0.5)
    expected = losses.pointwise_logistic_loss(scores, labels) + 0.5 * -torch.nn.functional.logsigmoid(
        torch.tensor(3.0)
    )
    assert_close(loss, expected)
    assert parts["pairs"] == 1.0 and "pairwise_loss" in parts
    loss_no_pairs, parts = losses.reward_loss(scores, labels, [])
    assert_close(loss_no_pairs, losses.pointwise_logistic_loss(scores, labels))
    assert "pairwise_loss" not in parts


def test_reward_loss_gradient_pushes_up_above_down():
    scores = torch.zeros(2, requires_grad=True)
    loss, _ = losses.reward_loss(scores, torch.tensor([1.0, 0.0]), [(0, 1)])
    loss.backward()
    assert scores.grad[0] < 0 < scores.grad[1]  # descent raises the up score, lowers the down one


def test_accuracy_auc_log_loss():
    scores = torch.tensor([2.0, 1.0, -1.0, 0.5])
    labels = torch.tensor([1.0, 0.0, 0.0, 1.0])
    assert losses.accuracy(scores, labels) == pytest.approx(0.75)
    # up scores {2, 0.5}, down {1, -1}: pairs won 2>1, 2>-1, 0.5>-1, lost 0.5<1 -> 3/4
    assert losses.auc(scores, labels) == pytest.approx(0.75)
    assert losses.auc(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0])) == pytest.approx(0.5)  # tie
    assert math.isnan(losses.auc(scores, torch.ones(4)))
    expected = torch.nn.functional.binary_cross_entropy_with_logits(scores, labels).item()
    assert losses.log_loss(scores, labels) == pytest.approx(expected)
