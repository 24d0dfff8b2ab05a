"""The report's HTML page: the verdict, the closing figures, per-version, per-round and per-canary-trial
tables, the first and the last version side by side (when compared), the plots.

Plain HTML with the PNGs beside it (no scripts, no network), so the folder can be mailed or archived as is.
Every value that came from the topics is escaped.
"""

import html
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rlhf_online.sim.plots import PLOTS
from rlhf_online.sim.runlog import Round
from rlhf_online.sim.stats import TrialSpan, Verdict, VersionRow

if TYPE_CHECKING:  # sim.compare imports torch and transformers; the report itself needs neither
    from rlhf_online.sim.compare import Comparison, Fluency, Pair

MAX_ROUND_ROWS = 50  # the rounds table shows the last this many
_COLOURS = {True: "#d4f4dd", False: "#fde2e1", None: "#eeeeee"}  # by Verdict.learning

_STYLE = """
body { font-family: sans-serif; max-width: 1000px; margin: 2em auto; color: #222; }
.verdict { padding: 1em; border-radius: 6px; font-size: 1.2em; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
td:first-child, th:first-child { text-align: left; }
td.text { text-align: left; }
td.answer { text-align: left; vertical-align: top; white-space: pre-wrap; }
img { max-width: 100%; border: 1px solid #eee; }
"""

esc = html.escape


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _num(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _version(brief: dict | None) -> str:
    """A Verdict's first/last version in words."""
    return f"{brief['version']}: {_pct(brief['up_rate'])} of {brief['ratings']} ratings" if brief else "-"


def _row(cells: Sequence[str], tag: str = "td", text: str | None = None) -> str:
    """A table row of `cells`; `text`, if given, is a last cell of words, aligned left."""
    last = f'<td class="text">{text}</td>' if text is not None else ""
    return "<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + last + "</tr>"


def figures_table(v: Verdict) -> str:
    """The closing figures, one row each."""
    figures = [
        ("first version", _version(v.first)),
        ("last version", _version(v.last)),
        ("answers served / ratings", f"{v.served} / {v.ratings}"),
        (
            "PPO rounds (passed, rejected by the gate)",
            f"{v.rounds} ({v.rounds_published}, {v.rounds_rejected})",
        ),
        ("swaps in serving", str(v.swaps)),
        ("wall time", f"{v.wall_time_s / 60:.1f} min"),
    ]
    if v.canary_trials:
        trials = f"{v.canary_trials} ({v.canary_promoted}, {v.canary_rolled_back})"
        figures.insert(4, ("canary trials (promoted, rolled back)", trials))
    return "<table>" + "".join(_row([esc(k), esc(val)], "th") for k, val in figures) + "</table>"


def versions_table(rows: Sequence[VersionRow]) -> str:
    """Per policy version: served, rated, thumbs up, rate with its 95% interval, the hidden judge's mean."""
    head = ["version", "served", "ratings", "thumbs up", "up rate", "95% interval", "hidden judge P(up)"]
    body = []
    for r in rows:
        interval = f"{_pct(r.interval[0])} – {_pct(r.interval[1])}" if r.rated else "-"
        cells = [esc(r.version), str(r.served), str(r.rated), str(r.up), _pct(r.up_rate), interval]
        body.append(_row([*cells, _pct(r.judge_mean)]))
    return "<table>" + _row(head, "th") + "".join(body) + "</table>"


def rounds_table(rounds: Sequence[Round]) -> str:
    """The last MAX_ROUND_ROWS PPO rounds: outcome, versions, figures and the gate's reason."""
    if not rounds:
        return "<p>No PPO round was reported on the rounds topic.</p>"
    head = ["round", "outcome", "from", "published", "reward", "KL", "gate", "reason"]
    body = []
    for r in rounds[-MAX_ROUND_ROWS:]:
        cells = [
            esc(r.name or str(r.round)),
            esc(r.outcome),
            esc(r.start_version),
            esc(r.published_version or "-"),
        ]
        cells += [_num(r.reward_mean), _num(r.kl, 2), esc(r.gate_code)]
        body.append(_row(cells, text=esc(r.gate_reason)))
    shown = (
        f"<p>The last {MAX_ROUND_ROWS} of {len(rounds)} rounds.</p>" if len(rounds) > MAX_ROUND_ROWS else ""
    )
    return shown + "<table>" + _row(head, "th") + "".join(body) + "</table>"


def _arm(ratings: int, ups: int) -> str:
    return f"{ups} / {ratings}"


def trials_table(spans: Sequence[TrialSpan]) -> str:
    """One row per canary trial: its versions and share, each arm's ratings and rate, the always-valid
    bounds on the difference, the outcome and the trainer's reason."""
    if not spans:
        return "<p>No canary trial was run (the trainer runs them with --canary-share).</p>"
    head = ["canary", "stable", "share", "canary up / ratings", "stable up / ratings", "canary rate"]
    head += ["stable rate", "difference (bounds)", "margin", "outcome", "reason"]
    body = []
    for s in spans:
        d = s.decision
        cells = [esc(s.canary), esc(s.stable), _pct(s.share)]
        if d is None:
            cells += ["-"] * 6
        else:
            bounds = f"{d.difference:+.3f} [{d.lower:+.3f}, {d.upper:+.3f}]"
            cells += [_arm(d.canary_ratings, d.canary_ups), _arm(d.stable_ratings, d.stable_ups)]
            cells += [_pct(d.canary_rate), _pct(d.stable_rate), bounds, _num(d.margin, 2)]
        outcome = s.outcome or "open"
        cells.append(esc(f"{outcome} ({d.code})" if d and d.code else outcome))
        reason = (
            d.reason if d else ("no CanaryDecision on the canary topic" if s.outcome else "still running")
        )
        body.append(_row(cells, text=esc(reason)))
    return "<table>" + _row(head, "th") + "".join(body) + "</table>"


def _answer(text: str, finish: str) -> str:
    """An answer cell: escaped, newlines kept (the style's pre-wrap), marked where max_new_tokens cut it."""
    cut = " <em>[cut at max_new_tokens]</em>" if finish == "length" else ""
    return f'<td class="answer">{esc(text)}{cut}</td>'


def pairs_table(first: str, last: str, pairs: "Sequence[Pair]") -> str:
    """One row per held-out prompt: the prompt, the first version's greedy answer, the last one's."""
    if not pairs:
        return "<p>No held-out prompt to compare the versions on.</p>"
    head = _row(["prompt", esc(f"{first} (first)"), esc(f"{last} (last)")], "th")
    body = [
        f'<tr><td class="answer">{esc(p.prompt)}</td>{_answer(p.first, p.first_finish)}'
        f"{_answer(p.last, p.last_finish)}</tr>"
        for p in pairs
    ]
    return "<table>" + head + "".join(body) + "</table>"


def fluency_table(fluency: "Sequence[Fluency]") -> str:
    """Per version: answers scored, their length, the reference's log-prob per token, the KL to it."""
    if not fluency:
        return "<p>No served answers to score (no outcomes file, or no version in it).</p>"
    head = ["version", "answers", "tokens per answer", "reference log-prob per token", "KL to the reference"]
    body = []
    for f in fluency:
        cells = [esc(f.version), str(f.answers), _num(f.tokens_per_answer, 1)]
        body.append(_row([*cells, _num(f.ref_logprob_per_token), _num(f.kl_to_reference, 2)]))
    return "<table>" + _row(head, "th") + "".join(body) + "</table>"


def comparison_section(c: "Comparison") -> str:
    """The held-out prompts side by side, then the fluency of every version's served answers."""
    return "\n".join(
        [
            "<h2>What changed: the first and the last version on the same held-out prompts</h2>",
            "<p>Greedy answers to prompts the trainer never trained on, rendered and stopped as serving "
            "does.</p>",
            pairs_table(c.first, c.last, c.pairs),
            "<h2>Fluency of the served answers</h2>",
            "<p>The base model's mean log-prob per token of each version's served answers (nats; closer to "
            "0 reads as more fluent to it) and the version's KL to the base, summed over an answer's tokens "
            "(nats, the k1 estimate on the answers it sampled). Text a wrecked policy writes scores far "
            "lower than the base's own answers.</p>",
            fluency_table(list(c.fluency.values())),
        ]
    )


def images() -> str:
    return "".join(
        f'<h2>{esc(caption)}</h2><img src="{name}" alt="{esc(caption)}">' for name, caption, _ in PLOTS
    )


def how_to_read(min_ratings: int, notes: Sequence[str]) -> str:
    """What each figure means, and the caller's notes."""
    items = [
        "The thumbs-up rate counts ratings accepted by SubmitFeedback (the feedback topic), by the "
        "version that produced the rated answer. Versions count in the verdict "
        f"once they have {min_ratings} ratings.",
        "The hidden judge's P(up) is the simulated users' true preference before rater noise; the system "
        "never sees it.",
        "The reward model's accuracy is on held-out ratings it never trained on; compare it with the "
        "majority baseline.",
        "PPO rounds are the trainer's RoundEvents (the rounds topic): every round, whether the gate passed "
        "it, rejected it, or it failed.",
        "A canary trial serves a passed version to a share of the users beside the stable one until the "
        "users' thumbs decide (the canary topic's CanaryDecisions). Its figures are the trainer's; the "
        "bounds are an always-valid confidence sequence on canary rate - stable rate, the plot's bands "
        "pointwise Wilson intervals. A canary that was rolled back never served all users: it is no swap "
        "and does not count as the last version in the verdict.",
        *notes,
    ]
    return "<ul>" + "".join(f"<li>{esc(item)}</li>" for item in items) + "</ul>"


def page(
    title: str,
    v: Verdict,
    rows: Sequence[VersionRow],
    rounds: Sequence[Round],
    min_ratings: int,
    notes: Sequence[str] = (),
    trials: Sequence[TrialSpan] = (),
    comparison: "Comparison | None" = None,
) -> str:
    """The whole report.html."""
    body = [
        f"<h1>{esc(title)}</h1>",
        f'<p class="verdict" style="background: {_COLOURS[v.learning]}">{esc(v.headline)}</p>',
        figures_table(v),
        "<h2>Per version</h2>",
        versions_table(rows),
        comparison_section(comparison) if comparison is not None else "",
        "<h2>PPO rounds and the gate's decisions</h2>",
        rounds_table(rounds),
        "<h2>Canary trials</h2>",
        trials_table(trials),
        images(),
        "<h2>How to read this</h2>",
        how_to_read(min_ratings, notes),
        f"<p><small>Written {time.strftime('%Y-%m-%d %H:%M:%S')} by rlhf-online report.</small></p>",
    ]
    head = f'<head><meta charset="utf-8"><title>{esc(title)}</title><style>{_STYLE}</style></head>'
    return f"<!doctype html>\n<html>{head}<body>\n" + "\n".join(body) + "\n</body></html>\n"
