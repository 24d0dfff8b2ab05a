"""Can PPO learn a preference at all? The trainer's rounds against the judge itself, with no reward model.

The whole loop (benchmarks/learning_suite.py) can fail a judge for two reasons: the reward model cannot
tell the answers apart, or PPO cannot move the policy towards what the reward model says. This script
isolates the second: it runs the trainer's own `run_round` (the same rollouts, GAE, clipped updates, KL
and gate as `serve-trainer`) for `--rounds` rounds, with the judge's verdict as the reward (a perfect,
noise-free reward model: score = scale * (2 P(up) - 1)), on the simulator's prompts, and prints per judge
the held-out judge rate of the serving version after every round.

    .venv/bin/python benchmarks/ppo_oracle.py --judges starts,ends --rounds 10
    .venv/bin/python benchmarks/ppo_oracle.py --judges starts --trainer-args "--lam 1.0"

One round here is what one round of the demo's trainer does (its defaults, the tiny preset's learning rate on
the tiny preset, then `--trainer-args`), without
the waiting for ratings, so `--rounds 10` is about what an 8-minute tiny demo gets.
"""

import argparse
import copy
import itertools
import logging
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from rlhf_online.config import parse_config
from rlhf_online.engine.chat_format import render_prompt
from rlhf_online.engine.tiny_model import TINY_LEARNING_RATE, is_tiny_preset, write_tiny_model
from rlhf_online.sim.judges import load_judge, thumbs_up_probability
from rlhf_online.sim.preferences import TINY_SUITE
from rlhf_online.sim.simulate import load_prompts
from rlhf_online.trainer import ppo
from rlhf_online.trainer import round as round_module
from rlhf_online.trainer.config import TrainerConfig
from rlhf_online.trainer.kl import make_kl_controller
from rlhf_online.trainer.policy import build_policy, freeze_all_but_top_layers, load_reference
from rlhf_online.trainer.round import run_round
from rlhf_online.trainer.triggers import split_prompts


def oracle_reward(judge, scale: float):
    """reward_fn(prompts, responses) -> (B,) scale * (2 P(up) - 1): the judge as a perfect reward model."""

    def reward_fn(prompts: list[str], responses: list[str]) -> torch.Tensor:
        p = [thumbs_up_probability(judge, pr, r) for pr, r in zip(prompts, responses, strict=True)]
        return scale * (2 * torch.tensor(p) - 1)  # (B,)

    return reward_fn


class DenseOracle:
    """Potential-based reward shaping (Ng et al. 1999) with the judge as the potential: token t earns
    scale * (2 P(up | answer[:t+1]) - 2 P(up | answer[:t])), so the credit lands on the token that changed
    the verdict; the per-token rewards of an answer add up to its score (minus the empty answer's). The
    tiny preset only (one token, one character). Installed by patching the round's `compute_rewards`."""

    def __init__(self, judge, scale: float) -> None:
        self.judge, self.scale = judge, scale
        self.dense: torch.Tensor | None = None  # (B, T) of the last scored rollouts

    def reward_fn(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        rows = []
        for prompt, text in zip(prompts, responses, strict=True):
            phi = [2 * thumbs_up_probability(self.judge, prompt, text[:t]) - 1 for t in range(len(text) + 1)]
            rows.append([self.scale * (b - a) for a, b in itertools.pairwise(phi)])
        width = max((len(r) for r in rows), default=0) + 1
        self.dense = torch.tensor([r + [0.0] * (width - len(r)) for r in rows])  # (B, width)
        # the whole answer's score, for the gate; the rollouts' rewards take the dense part instead
        ends = [thumbs_up_probability(self.judge, p, r) for p, r in zip(prompts, responses, strict=True)]
        return self.scale * (2 * torch.tensor(ends) - 1)  # (B,)

    def compute_rewards(self, scores, logprobs, ref_logprobs, mask, kl_coef, kl_kind="k1"):
        zero = torch.zeros_like(scores)
        rewards, kl = ppo.compute_rewards(zero, logprobs, ref_logprobs, mask, kl_coef, kl_kind)
        t = min(rewards.shape[1], self.dense.shape[1])
        rewards[:, :t] += self.dense[:, :t].to(rewards.dtype)
        return rewards * mask, kl


def rate(score: float, scale: float) -> float:
    """The judge rate behind a mean oracle score."""
    return (score / scale + 1) / 2


def run_judge(
    model_dir: Path,
    name: str,
    judge_args: str,
    config: TrainerConfig,
    rounds: int,
    scale: float,
    carry: bool,
    dense: bool = False,
):
    """Rounds of PPO (top_layers mode) on one judge.

    Yields (round, passed, serving rate, candidate rate, candidate KL, seconds) per round.
    """
    torch.manual_seed(config.seed)
    judge = load_judge(name, judge_args)
    reward_fn = oracle_reward(judge, scale)
    if dense:
        shaped = DenseOracle(judge, scale)
        round_module.compute_rewards = shaped.compute_rewards  # the rollouts' rewards only
        reward_fn = shaped.reward_fn
    reference = load_reference(model_dir)
    policy = build_policy(model_dir, train_mode=config.train_mode, trainable_layers=config.trainable_layers)
    tokenizer = _tokenizer(model_dir)
    prompts = [render_prompt(tokenizer, [("user", p)]) for p in load_prompts()]
    train, heldout = split_prompts(prompts, config.heldout_fraction, config.eval_prompts)
    kl_ctl = make_kl_controller(config.kl_controller, config.kl_coef, config.kl_target, config.kl_horizon)
    serving = copy.deepcopy(policy.lm).eval()  # what the gate compares against: the last published version
    serving_state = copy.deepcopy(policy.state_dict())
    answers = None  # the serving version's held-out answers, re-scored instead of sampled again
    for number in range(1, rounds + 1):
        t0 = time.perf_counter()
        result = run_round(
            policy, reference, tokenizer, reward_fn, train, heldout, config, kl_ctl,
            seed=config.seed + number, name=f"{name}-{number}", serving=serving, serving_answers=answers,
        )  # fmt: skip
        answers = result.serving_eval
        if result.decision.passed:
            serving, serving_state = copy.deepcopy(result.model).eval(), copy.deepcopy(policy.state_dict())
            answers = result.candidate_eval
        elif not (carry and result.decision.code == "no_improvement"):
            policy.load_state_dict(serving_state)  # the next round starts from the serving version
        # The round exported (froze) the LM; the service loads the next round's policy afresh, so thaw it.
        freeze_all_but_top_layers(policy.lm, config.trainable_layers)
        cand = result.candidate_eval
        yield (
            number, result.decision.passed, rate(result.serving_eval.mean_score, scale),
            rate(cand.mean_score, scale) if cand else float("nan"),
            cand.kl_to_reference if cand else float("nan"),
            time.perf_counter() - t0,
        )  # fmt: skip


def _tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, help="default: a fresh tiny preset (seed 0)")
    parser.add_argument("--judges", default=",".join(TINY_SUITE), help="comma-separated suite judges")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--scale", type=float, default=2.0, help="oracle score of a sure thumbs up")
    parser.add_argument("--trainer-args", default="", help="serve-trainer flags (shell words)")
    parser.add_argument(
        "--carry", action="store_true", help="a round the gate rejects for no improvement is kept to train on"
    )
    parser.add_argument("--dense", action="store_true", help="shaped per-token rewards (DenseOracle)")
    parser.add_argument("-v", action="store_true", help="log every round's figures")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO if "-v" in sys.argv else logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or write_tiny_model(Path(tmp) / "tiny", seed=0)
        tiny = ["--learning-rate", str(TINY_LEARNING_RATE)] if is_tiny_preset(model_dir) else []
        config = parse_config(TrainerConfig, [*tiny, *shlex.split(args.trainer_args)], {})
        print(f"# trainer args: {args.trainer_args or '(defaults)'}; {args.rounds} rounds", flush=True)
        print("| judge | start | after each round (serving rate; * = gate rejected) | last | KL | s/round |")
        print("|---|---|---|---|---|---|")
        for name in args.judges.split(","):
            rows = list(
                run_judge(
                    model_dir,
                    name,
                    TINY_SUITE.get(name, ""),
                    config,
                    args.rounds,
                    args.scale,
                    args.carry,
                    args.dense,
                )
            )
            trail = " ".join(f"{r[3]:.2f}" if r[1] else f"{r[3]:.2f}*" for r in rows)
            last = next((r[3] for r in reversed(rows) if r[1]), rows[0][2])
            kl = next((r[4] for r in reversed(rows) if r[1]), 0.0)
            print(
                f"| {name} | {rows[0][2]:.2f} | {trail} | {last:.2f} | {kl:.1f} | "
                f"{sum(r[5] for r in rows) / len(rows):.1f} |",
                flush=True,
            )
    sys.exit(0)


if __name__ == "__main__":
    main()
