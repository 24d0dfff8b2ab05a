"""sim.compare on the tiny preset: greedy answers side by side, the held-out pick, the fluency figures, and
the report's tables and summary.json "fluency"."""

import json
import math

import pytest
import torch
from transformers import AutoTokenizer

from rlhf_online.bootstrap import ensure_initial_policy
from rlhf_online.contract import POLICY
from rlhf_online.engine.chat_format import render_prompt
from rlhf_online.registry import Registry
from rlhf_online.sim import compare, report
from rlhf_online.sim.compare import Comparison, Fluency, Pair
from rlhf_online.sim.runlog import RunData
from rlhf_online.sim.simulate import load_prompts
from rlhf_online.trainer.policy import load_causal_lm
from rlhf_online.trainer.rollout import sample_rollouts
from rlhf_online.trainer.triggers import prompt_hash, split_prompts

PROMPTS = ["Hi there!", "What is 2 + 2?", "Name a colour."]


def perturbed(base_dir, scale: float = 0.5):
    """The base model with Gaussian noise of `scale` times each weight's std added (seeded)."""
    lm = load_causal_lm(base_dir)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale * p.std().clamp(min=1e-3))
    return lm


def outcome(i: int, prompt: str, text: str, version: str, finish: str = "length") -> dict:
    """A simulate.Outcome row with the fields compare reads."""
    return {"index": i, "prompt": prompt, "text": text, "model_version": version, "finish_reason": finish}


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    """A run folder: v000001 (the base) and v000002 (perturbed) in its registry, and outcomes of both, each
    version's answers sampled from it at temperature 1 (as serving does by default)."""
    run = tmp_path_factory.mktemp("run")
    registry = Registry(run / "registry")
    ensure_initial_policy(registry, tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    registry.publish_model(POLICY, perturbed(tiny_model_dir), tokenizer, parent_version="v000001")
    prompts = PROMPTS * 4
    rows = []
    for version in ("v000001", "v000002"):
        lm = load_causal_lm(registry.path(POLICY, version)).eval()
        rendered = [render_prompt(tokenizer, [("user", p)]) for p in prompts]
        sampled = sample_rollouts(
            lm, tokenizer, rendered, max_new_tokens=16, temperature=1.0, max_prompt_tokens=128,
            batch_size=16, seed=0,
        )  # fmt: skip
        stopped = (sampled.response_ids == tokenizer.eos_token_id).any(dim=1).tolist()  # (B,)
        for prompt, text, stop in zip(prompts, sampled.responses, stopped, strict=True):
            rows.append(outcome(len(rows), prompt, text, version, "stop" if stop else "length"))
    rows.append({**outcome(len(rows), "x", "", ""), "error": "Chat UNAVAILABLE: down"})  # not served
    (run / "outcomes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_side_by_side_gives_one_pair_per_prompt_and_greedy_is_deterministic(run_dir):
    same = compare.side_by_side(run_dir / "registry", "v000001", "v000001", PROMPTS, max_new_tokens=12)
    assert [p.prompt for p in same] == PROMPTS
    assert all(isinstance(p.first, str) and p.first and p.first == p.last for p in same)
    assert all(p.first_finish in ("stop", "length") and p.first_finish == p.last_finish for p in same)
    changed = compare.side_by_side(run_dir / "registry", "v000001", "v000002", PROMPTS, max_new_tokens=12)
    assert all(p.first and p.last for p in changed)
    assert [p.first for p in changed] == [p.first for p in same]
    assert any(p.first != p.last for p in changed)


def test_greedy_answers_stop_at_the_end_of_the_turn(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    eos = tokenizer.eos_token_id
    assert compare._until_stop(tokenizer, [*tokenizer.encode("ok"), eos, 70, 71], {eos}) == ("ok", "stop")
    assert compare._until_stop(tokenizer, tokenizer.encode("ok"), {eos}) == ("ok", "length")


def test_heldout_prompts_are_those_the_trainer_holds_out(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = load_prompts()
    picked = compare.heldout_prompts(tokenizer, prompts, 8)
    hashes = [prompt_hash(render_prompt(tokenizer, [("user", p)])) for p in picked]
    assert len(picked) == 8 and all(h < 0.2 for h in hashes) and hashes == sorted(hashes)
    assert compare.heldout_prompts(tokenizer, prompts, 8) == picked
    train, _ = split_prompts([render_prompt(tokenizer, [("user", p)]) for p in prompts], 0.2, 8)
    assert not {render_prompt(tokenizer, [("user", p)]) for p in picked} & set(train)


def test_fluency_of_the_base_has_no_kl_and_a_perturbed_version_some(run_dir, tiny_model_dir):
    figures = compare.fluency(
        run_dir / "registry", run_dir / "outcomes.jsonl", ["v000001", "v000002"], tiny_model_dir,
        max_answers=8,
    )  # fmt: skip
    base, changed = figures["v000001"], figures["v000002"]
    assert base.answers == 8 and changed.answers == 8
    assert abs(base.kl_to_reference) < 1e-4
    assert math.isfinite(base.ref_logprob_per_token) and base.ref_logprob_per_token < 0
    assert changed.kl_to_reference > 0.1
    assert (
        changed.ref_logprob_per_token < base.ref_logprob_per_token
    )  # the base finds its own answers likelier


def test_served_answers_are_a_deterministic_spread(run_dir):
    picked = compare.served_answers(run_dir / "outcomes.jsonl", "v000002", 4)
    assert [r["index"] for r in picked] == [12, 15, 18, 21]
    assert len(compare.served_answers(run_dir / "outcomes.jsonl", "v000002", 100)) == 12
    assert compare.served_versions(run_dir / "outcomes.jsonl", Registry(run_dir / "registry")) == [
        "v000001",
        "v000002",
    ]


def test_compare_run_writes_the_whole_comparison(run_dir, tiny_model_dir):
    c = compare.compare_run(
        run_dir, tiny_model_dir, first="v000001", last="v000002", n_prompts=2, max_new_tokens=8, max_answers=4
    )
    assert (c.first, c.last, len(c.pairs)) == ("v000001", "v000002", 2)
    assert list(c.fluency) == ["v000001", "v000002"] and c.fluency["v000001"].answers == 4
    saved = json.loads(c.to_json())
    assert saved["pairs"][0]["prompt"] == c.pairs[0].prompt and saved["fluency"]["v000002"]["answers"] == 4


def test_report_shows_the_comparison_and_summary_has_fluency(tmp_path):
    pairs = [Pair("Say <hi>", "line one\nline two", "hello & bye", "stop", "length")]
    fluency = {
        "v000001": Fluency("v000001", 48, 20.5, -1.25, 0.0),
        "v000004": Fluency("v000004", 40, 12.0, -3.5, 4.2),
    }
    path = report.write_report(
        RunData(), tmp_path, comparison=Comparison("v000001", "v000004", pairs, fluency)
    )
    html = path.read_text()
    assert "What changed: the first and the last version on the same held-out prompts" in html
    assert "Say &lt;hi&gt;" in html and "line one\nline two" in html and "hello &amp; bye" in html
    assert "v000004 (last)" in html and "cut at max_new_tokens" in html
    assert "<td>-3.500</td><td>4.20</td>" in html
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["fluency"]["v000004"]["kl_to_reference"] == 4.2
    assert summary["fluency"]["v000001"]["answers"] == 48


def test_report_without_a_comparison_has_neither(tmp_path):
    path = report.write_report(RunData(), tmp_path)
    assert "What changed" not in path.read_text()
    assert "fluency" not in json.loads((tmp_path / "summary.json").read_text())
