"""Hidden preferences of simulated users: a judge maps (prompt, response) to the chance of a thumbs up.

The system never sees a judge; it only sees the thumbs the simulator derives from it, so a judge plays the
part of what real users like. A judge returns a bool (a firm verdict) or a probability in [0, 1].

Built-in judges (`--judge NAME`, options as `--judge-args key=value,key=value`):

    lowercase   likes answers written mostly in lowercase letters (the default of the demo)
    vowels      likes answers rich in vowels
    charclass   likes answers rich in any set of characters (`chars=...`)
    length      likes answers of a target length
    keyword     likes answers that contain one of some keywords

The preference suite (`rlhf_online/sim/preferences.py`) adds one judge of every kind, calibrated on the tiny
preset and on a real chat model: contains, absent, starts, ends, keyword_words, upper_and_lowercase, and for
real text concise, addresses_user, structured, enthusiastic (asks_back and no_lists stay selectable).

Any Python callable works too: `--judge mypackage.mymodule:likes_cats`, where
`def likes_cats(prompt: str, response: str) -> bool | float`.

Why `lowercase` is the demo's default: the tiny demo model has a character-level tokenizer over printable
ASCII and starts near uniform over it, so about 27% of its characters are lowercase letters. A preference for
a larger share is a per-token signal: every sampled character moves the verdict a little, which the reward
model picks up from several hundred ratings and PPO turns into a policy that writes more lowercase letters.
"""

import importlib
import math
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass

Judge = Callable[[str, str], "bool | float"]


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def char_share(text: str, chars: Iterable[str]) -> float:
    """Fraction of the characters of `text` that are in `chars` (0.0 for an empty text)."""
    if not text:
        return 0.0
    wanted = frozenset(chars)
    return sum(c in wanted for c in text) / len(text)


@dataclass(frozen=True)
class CharClassJudge:
    """P(up) = sigmoid((share - threshold) / temperature), share = fraction of the answer's chars in `chars`.

    Answers shorter than `min_chars` get P(up) = 0, so an empty or one-letter answer is never a cheap win.
    """

    chars: frozenset[str]
    threshold: float
    temperature: float = 0.03
    min_chars: int = 8

    def __call__(self, prompt: str, response: str) -> float:
        if len(response) < self.min_chars:
            return 0.0
        return sigmoid((char_share(response, self.chars) - self.threshold) / self.temperature)


@dataclass(frozen=True)
class LengthJudge:
    """P(up) falls off with the distance of the answer's length in characters from `target` (a Gaussian)."""

    target: int = 80
    width: float = 20.0

    def __call__(self, prompt: str, response: str) -> float:
        return math.exp(-0.5 * ((len(response) - self.target) / self.width) ** 2)


@dataclass(frozen=True)
class KeywordJudge:
    """Thumbs up when the answer contains any of `keywords` (case-insensitive); else `base` chance of up."""

    keywords: tuple[str, ...]
    base: float = 0.1

    def __call__(self, prompt: str, response: str) -> float:
        lowered = response.lower()
        return 1.0 if any(k.lower() in lowered for k in self.keywords) else self.base


def lowercase(threshold: float = 0.32, temperature: float = 0.01, min_chars: int = 8) -> CharClassJudge:
    """Likes answers more than 32% lowercase letters, with a nearly firm verdict (temperature 0.01).

    The tiny model's 32-token answers are 27% lowercase on average (sd 10%), so P(up) starts near 25% (28%
    with 5% rater noise) and can rise to 1 (0.95 with noise). A firm verdict matters: with a soft one (0.03)
    and 10% noise the tiny reward model learned nothing from a thousand ratings.
    """
    return CharClassJudge(frozenset(string.ascii_lowercase), threshold, temperature, min_chars)


def vowels(threshold: float = 0.14, temperature: float = 0.02, min_chars: int = 8) -> CharClassJudge:
    """Likes vowels (aeiouAEIOU, about 10% of a uniform random answer)."""
    return CharClassJudge(frozenset("aeiouAEIOU"), threshold, temperature, min_chars)


def charclass(
    chars: str = string.ascii_lowercase,
    threshold: float = 0.36,
    temperature: float = 0.03,
    min_chars: int = 8,
) -> CharClassJudge:
    """Likes any set of characters, given literally (`chars=abc`)."""
    if not chars:
        raise ValueError("charclass needs a non-empty chars=...")
    return CharClassJudge(frozenset(chars), threshold, temperature, min_chars)


def length(target: int = 80, width: float = 20.0) -> LengthJudge:
    return LengthJudge(target, width)


def keyword(words: str = "thanks|please|sure", base: float = 0.1) -> KeywordJudge:
    """`words` is a `|`-separated list."""
    keywords = tuple(w for w in words.split("|") if w)
    if not keywords:
        raise ValueError("keyword needs words=a|b|c with at least one word")
    return KeywordJudge(keywords, base)


BUILTIN: dict[str, Callable[..., Judge]] = {
    "lowercase": lowercase,
    "vowels": vowels,
    "charclass": charclass,
    "length": length,
    "keyword": keyword,
}


def builtin_judges() -> dict[str, Callable[..., Judge]]:
    """The judges `--judge NAME` accepts: the ones above and the preference suite's (sim/preferences.py)."""
    from rlhf_online.sim.preferences import SUITE_JUDGES  # it builds on this module's judges

    return {**BUILTIN, **SUITE_JUDGES}


def parse_judge_args(text: str) -> dict[str, str]:
    """`"threshold=0.4,temperature=0.05"` -> {"threshold": "0.4", "temperature": "0.05"}."""
    args: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(
                f"judge argument {part!r} is not key=value; write e.g. threshold=0.4,temperature=0.05"
            )
        args[key.strip()] = value.strip()
    return args


def load_judge(spec: str, args: str = "") -> Judge:
    """A built-in judge by name (with `key=value,...` options) or any callable named `module:function`."""
    if ":" in spec:
        if args:
            raise ValueError("judge arguments apply to built-in judges only; bind them in your own function")
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"cannot import judge module {module_name!r} ({e}); is it on PYTHONPATH?") from e
        judge = getattr(module, attr, None)
        if not callable(judge):
            raise ValueError(
                f"{module_name!r} has no callable {attr!r}; a judge is f(prompt, response) -> bool|float"
            )
        return judge
    builtin = builtin_judges()
    if spec not in builtin:
        raise ValueError(f"unknown judge {spec!r}; use one of {sorted(builtin)} or module:function")
    factory = builtin[spec]
    hints = factory.__annotations__
    kwargs = {}
    for key, raw in parse_judge_args(args).items():
        if key not in hints or key == "return":
            raise ValueError(
                f"judge {spec!r} has no option {key!r}; it takes {sorted(set(hints) - {'return'})}"
            )
        kind = hints[key]
        try:
            kwargs[key] = kind(raw) if kind in (int, float) else raw
        except ValueError as e:
            raise ValueError(f"judge option {key}={raw!r} is not a valid {kind.__name__}") from e
    return factory(**kwargs)


def thumbs_up_probability(judge: Judge, prompt: str, response: str) -> float:
    """Calls the judge and turns its verdict into a probability in [0, 1]."""
    verdict = judge(prompt, response)
    if isinstance(verdict, bool):
        return 1.0 if verdict else 0.0
    p = float(verdict)
    if not math.isfinite(p):
        raise ValueError(f"judge returned {verdict!r}; it must return a bool or a probability in [0, 1]")
    return min(1.0, max(0.0, p))


def noisy(p_up: float, rater_noise: float) -> float:
    """P(thumbs up) of a rater who flips their verdict with probability `rater_noise` (raters disagree)."""
    return p_up * (1.0 - rater_noise) + (1.0 - p_up) * rater_noise
