"""Base rates of the simulator's judges: the share of a base model's answers each judge gives a thumbs up.

A preference that almost no base answer meets cannot be learned from ratings (nearly every thumbs up it gets
is rater noise), so every judge of the suite is calibrated so that 20-40% of the base model's answers meet it.
This script measures that: it samples answers of a model folder the way the demo's users get them (the
simulator's prompts, the chat template, temperature 1, top_p 1, the demo's answer length) and prints, per
judge, the mean P(up) without rater noise.

    .venv/bin/python benchmarks/calibrate_judges.py --model-dir .rlhf/models/tiny --n 600
    .venv/bin/python benchmarks/calibrate_judges.py --model-dir .rlhf/models/smollm2-135m --n 300 \
        --max-new-tokens 64 --answers runs/smollm2-answers.jsonl

`--answers FILE` caches the sampled answers (JSON lines), so re-scoring after a change of a judge is instant.
"""

import argparse
import json
import random
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_online.engine.chat_format import render_prompt
from rlhf_online.sim.judges import load_judge, thumbs_up_probability
from rlhf_online.sim.preferences import REAL_TEXT_SUITE, TINY_SUITE
from rlhf_online.sim.simulate import load_prompts


def sample_answers(model_dir: Path, n: int, max_new_tokens: int, batch: int, seed: int) -> list[dict]:
    """`n` (prompt, answer) pairs of the model, sampled in batches (left-padded, stop at end of turn)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompts = load_prompts("")
    rng = random.Random(seed)
    torch.manual_seed(seed)
    rows = []
    while len(rows) < n:
        chosen = [rng.choice(prompts) for _ in range(min(batch, n - len(rows)))]
        texts = [render_prompt(tokenizer, [("user", p)]) for p in chosen]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc.pop("token_type_ids", None)
        with torch.no_grad():
            out = model.generate(
                **enc, do_sample=True, temperature=1.0, top_p=1.0, max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
        for prompt, ids in zip(chosen, out[:, enc["input_ids"].shape[1] :], strict=True):
            rows.append({"prompt": prompt, "response": tokenizer.decode(ids, skip_special_tokens=True)})
        print(f"sampled {len(rows)}/{n}", file=sys.stderr)
    return rows


def base_rates(rows: list[dict], suite: dict[str, str]) -> dict[str, float]:
    """Judge name -> mean P(up) over the answers (no rater noise)."""
    rates = {}
    for name, args in suite.items():
        judge = load_judge(name, args)
        rates[name] = sum(thumbs_up_probability(judge, r["prompt"], r["response"]) for r in rows) / len(rows)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--answers", type=Path, help="cache of sampled answers (JSON lines)")
    parser.add_argument("--suite", choices=("tiny", "real"), default="tiny")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.answers and args.answers.exists():
        rows = [json.loads(line) for line in args.answers.read_text().splitlines()]
    else:
        rows = sample_answers(args.model_dir, args.n, args.max_new_tokens, args.batch, args.seed)
        if args.answers:
            args.answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    suite = TINY_SUITE if args.suite == "tiny" else REAL_TEXT_SUITE
    print(f"| judge | base rate ({len(rows)} answers of {args.model_dir.name}) |\n| --- | --- |")
    for name, rate in base_rates(rows, suite).items():
        print(f"| {name} | {100 * rate:.1f}% |")


if __name__ == "__main__":
    main()
