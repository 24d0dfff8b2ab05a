"""Which reward model learns every preference of the suite? Held-out AUC per judge, offline, in seconds.

The closed loop can only learn what its reward model can tell apart. This benchmark replays the reward
service's learning offline: answers of the base model (sampled once, cached), rated by each judge of the
suite with the demo's rater noise, fed to `OnlineLearner` in arrival order with the service's update size,
then scored on answers it never saw. A reward model shape that fails a judge here fails it in the loop.

    .venv/bin/python benchmarks/reward_suite.py --model-dir .rlhf/models/tiny \
        --variant "--backbone-layers 0" --variant "--backbone-layers 0 --pooling response_features"

Each `--variant` is a set of reward-service flags (backbone-layers, pooling, learning-rate, steps-per-update,
trainable-layers, max-length). The table gives the AUC against the judge's own P(up) as the truth.
"""

import argparse
import json
import random
import shlex
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from calibrate_judges import sample_answers

from rlhf_online.config import parse_config
from rlhf_online.engine.chat_format import render_prompt
from rlhf_online.reward.config import RewardConfig
from rlhf_online.reward.learner import LearnerSettings, OnlineLearner
from rlhf_online.reward.model import init_reward_model
from rlhf_online.reward.records import LabelledExample
from rlhf_online.sim.judges import load_judge, noisy, thumbs_up_probability
from rlhf_online.sim.preferences import REAL_TEXT_SUITE, TINY_SUITE


def auc(scores: list[float], truth: list[float]) -> float:
    """ROC AUC of `scores` against binary truth (P(up) > 0.5), ties counted half."""
    pos = [s for s, t in zip(scores, truth, strict=True) if t > 0.5]
    neg = [s for s, t in zip(scores, truth, strict=True) if t <= 0.5]
    if not pos or not neg:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def learn(config: RewardConfig, model_dir: Path, train: list[dict], judge, noise: float, seed: int):
    """An OnlineLearner fed `train` (rated by `judge` with rater noise) in updates of the service's size."""
    model = init_reward_model(
        model_dir, max_length=config.max_length, seed=config.seed, pooling=config.pooling,
        layers=config.backbone_layers,
    )  # fmt: skip
    # Every learning flag as the service passes it (reward/checkpoint.py), but nothing held out: the
    # benchmark holds out its own test answers.
    settings = LearnerSettings(**{f.name: getattr(config, f.name) for f in fields(LearnerSettings)})
    settings = replace(settings, heldout_fraction=0.0)
    learner = OnlineLearner(model, settings)
    rng = random.Random(seed)
    # The cost the service pays per update, the figure that sizes it on a CPU: CPU seconds of this process
    # (one torch thread), which a machine shared with other work does not inflate as it does wall time.
    update_s = []
    for i, row in enumerate(train):
        up = rng.random() < noisy(thumbs_up_probability(judge, row["prompt"], row["response"]), noise)
        learner.add(LabelledExample(f"e{i}", f"r{i}", row["rendered"], row["response"], float(up), "", 0))
        if len(learner.pending) >= config.update_every_examples:
            started = time.process_time()
            learner.update()
            update_s.append(time.process_time() - started)
    return learner, sum(update_s) / max(1, len(update_s))


def run_variant(flags: str, args, rows: list[dict], suite: dict[str, str]) -> tuple[dict[str, float], float]:
    """Judge name -> held-out AUC of the reward model built by `flags`, and its mean seconds per update."""
    config = parse_config(RewardConfig, shlex.split(flags), {})
    train, test = rows[: args.train], rows[args.train :]
    out, update_s = {}, []
    for name, judge_args in suite.items():
        judge = load_judge(name, judge_args)
        learner, seconds = learn(config, args.model_dir, train, judge, args.rater_noise, args.seed)
        update_s.append(seconds)
        scores = learner.model.score([r["rendered"] for r in test], [r["response"] for r in test]).tolist()
        truth = [thumbs_up_probability(judge, r["prompt"], r["response"]) for r in test]
        out[name] = auc(scores, truth)
    return out, sum(update_s) / len(update_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--variant", action="append", default=[], help="reward-service flags (repeat)")
    parser.add_argument("--train", type=int, default=800, help="ratings learnt from, per judge")
    parser.add_argument("--test", type=int, default=400, help="answers scored")
    parser.add_argument("--rater-noise", type=float, default=0.05)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--answers", type=Path, help="cache of sampled answers (JSON lines)")
    parser.add_argument("--suite", choices=("tiny", "real"), default="tiny")
    parser.add_argument("--judges", default="", help="only these judges of the suite (comma-separated)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    n = args.train + args.test
    if args.answers and args.answers.exists():
        rows = [json.loads(line) for line in args.answers.read_text().splitlines()][:n]
        if len(rows) < n:
            sys.exit(f"{args.answers} holds {len(rows)} answers; --train + --test need {n} (or a new file)")
    else:
        rows = sample_answers(args.model_dir, n, args.max_new_tokens, 64, args.seed)
        if args.answers:
            args.answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    for r in rows:
        r["rendered"] = render_prompt(tokenizer, [("user", r["prompt"])])
    suite = TINY_SUITE if args.suite == "tiny" else REAL_TEXT_SUITE
    if args.judges:  # a costly variant (a deep backbone on a CPU) timed on one judge
        unknown = set(args.judges.split(",")) - set(suite)
        if unknown:
            sys.exit(f"--judges: {sorted(unknown)} not in the {args.suite} suite ({', '.join(suite)})")
        suite = {name: suite[name] for name in args.judges.split(",")}
    variants = args.variant or [""]
    print("| reward model flags | " + " | ".join(suite) + " | mean | CPU s/update | CPU time | wall time |")
    print("| --- " * (len(suite) + 5) + "|")
    for flags in variants:
        started, started_cpu = time.monotonic(), time.process_time()
        result, update_s = run_variant(flags, args, rows, suite)
        cells = " | ".join(f"{result[name]:.2f}" for name in suite)
        mean = sum(result.values()) / len(result)
        print(
            f"| `{flags or '(service defaults)'}` | {cells} | {mean:.2f} | {update_s:.1f} "
            f"| {time.process_time() - started_cpu:.0f} s | {time.monotonic() - started:.0f} s |",
            flush=True,
        )


if __name__ == "__main__":
    main()
