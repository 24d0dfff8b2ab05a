"""The preference suite: judges of every kind that real users' preferences come in, each calibrated.

A loop that learns only the preference it was tuned on is no use to someone whose users like something else,
so the learning benchmark (`benchmarks/learning_suite.py`) runs the loop once per judge of a suite. The kinds:
a share of a character class, the presence of any one of some strings, their absence, a target length, how
the answer starts, how it ends, a keyword, and a combination of two.

Every judge is calibrated so that 20-40% of the base model's answers meet it: a preference that almost no
base answer meets cannot be learned from ratings (nearly every thumbs up it gets is rater noise), and one
that most answers meet leaves little to learn. The base rates in the docstrings were measured with
`benchmarks/calibrate_judges.py` (600 answers of the tiny preset, seed 0, the demo's 32-token answers at
temperature 1; the real model: see REAL_TEXT_SUITE).

`TINY_SUITE` and `REAL_TEXT_SUITE` map judge names (`--judge NAME`) to their options (`--judge-args`).
"""

import string
from dataclasses import dataclass

from rlhf_online.sim.judges import Judge


@dataclass(frozen=True)
class ContainsJudge:
    """Thumbs up when the answer contains any of `needles` (or, with `absent`, none of them)."""

    needles: tuple[str, ...]
    absent: bool = False
    ignore_case: bool = False
    min_chars: int = 8  # an empty or one-letter answer is never a cheap win

    def __call__(self, prompt: str, response: str) -> bool:
        if len(response.strip()) < self.min_chars:
            return False
        text = response.lower() if self.ignore_case else response
        found = any((n.lower() if self.ignore_case else n) in text for n in self.needles)
        return found != self.absent


@dataclass(frozen=True)
class EdgeJudge:
    """Thumbs up when the answer's first (or last) non-space character is in `chars`."""

    chars: frozenset[str]
    at_end: bool = False

    def __call__(self, prompt: str, response: str) -> bool:
        text = response.strip()
        if not text:
            return False
        return (text[-1] if self.at_end else text[0]) in self.chars


@dataclass(frozen=True)
class WordCountJudge:
    """Thumbs up for answers of at most `max_words` words (and at least `min_words`): concise answers."""

    max_words: int
    min_words: int = 3

    def __call__(self, prompt: str, response: str) -> bool:
        return self.min_words <= len(response.split()) <= self.max_words


@dataclass(frozen=True)
class BothJudge:
    """Thumbs up with probability P(first) * P(second): a user who wants both."""

    first: Judge
    second: Judge

    def __call__(self, prompt: str, response: str) -> float:
        return float(self.first(prompt, response)) * float(self.second(prompt, response))


def _needles(words: str) -> tuple[str, ...]:
    """`"a|b|c"` -> ("a", "b", "c"); `\\n` in a word stands for a newline."""
    needles = tuple(w.replace("\\n", "\n") for w in words.split("|") if w)
    if not needles:
        raise ValueError("give at least one string, as words=a|b|c")
    return needles


def contains(words: str = "?") -> ContainsJudge:
    """Likes answers that contain any of `words` (`|`-separated).

    Tiny preset, default "?": 31.7% of base answers. Real model: see `asks_back`.
    """
    return ContainsJudge(_needles(words))


def absent(chars: str = "012346") -> ContainsJudge:
    """Likes answers with none of the characters `chars` anywhere (the absence kind, not a share).

    Tiny preset, default "012346" (none of these six digits): 24.5% of base answers.
    Real model: see `no_lists`.
    """
    if not chars:
        raise ValueError("absent needs chars=...")
    return ContainsJudge(tuple(chars), absent=True)


def starts(chars: str = string.ascii_uppercase) -> EdgeJudge:
    """Likes answers whose first character is one of `chars` (default: an uppercase letter).

    Tiny preset: 27.3% of base answers. The tiny demo's reward model (a bag of tokens, averaged over the
    answer) cannot see where a token stands, which is why this kind needs a reward model with position.
    """
    return EdgeJudge(frozenset(chars))


def ends(chars: str = string.punctuation) -> EdgeJudge:
    """Likes answers whose last character is one of `chars` (default: ASCII punctuation).

    Tiny preset: 35.7% of base answers.
    """
    return EdgeJudge(frozenset(chars), at_end=True)


# 25 common two-letter English words: a keyword list that a random-character answer meets by chance
# about a quarter of the time.
SHORT_WORDS = "of|to|in|it|is|be|as|at|so|we|he|by|or|on|do|if|me|my|up|an|go|no|us|am|hi"


def keyword(words: str = SHORT_WORDS, ignore_case: int = 1) -> ContainsJudge:
    """Likes answers that contain one of the keywords `words` (`|`-separated, case-insensitive by default).

    Tiny preset, default SHORT_WORDS as substrings: 23.2% of base answers.
    """
    return ContainsJudge(_needles(words), ignore_case=bool(ignore_case))


def upper_start_and_lowercase(threshold: float = 0.15) -> BothJudge:
    """Likes answers that start with an uppercase letter AND are more than `threshold` lowercase letters.

    Tiny preset: 24.9% of base answers (the two halves alone: 27.3% and about 90%).
    """
    from rlhf_online.sim.judges import CharClassJudge

    share = CharClassJudge(frozenset(string.ascii_lowercase), threshold, temperature=0.01)
    return BothJudge(starts(), share)


def concise(max_words: int = 25) -> WordCountJudge:
    """Real text: likes concise answers, at most `max_words` words."""
    return WordCountJudge(max_words)


def asks_back() -> EdgeJudge:
    """Real text: likes answers that end with a question back to the user."""
    return EdgeJudge(frozenset("?"), at_end=True)


# Markers of a list at the start of a line ("- ", "* ", "1. "), and Markdown emphasis.
LIST_MARKERS = "\\n-|\\n*|\\n1.|\\n2.|**|\\n•"


def no_lists(markers: str = LIST_MARKERS) -> ContainsJudge:
    """Real text: likes answers in plain prose, without lists or Markdown emphasis."""
    return ContainsJudge(_needles(markers), absent=True)


ENTHUSIASM = "!|great|love|amazing|wonderful|fantastic|happy to|glad"


def enthusiastic(words: str = ENTHUSIASM) -> ContainsJudge:
    """Real text: likes enthusiastic answers (an exclamation mark or a warm word)."""
    return ContainsJudge(_needles(words), ignore_case=True)


SUITE_JUDGES = {
    "contains": contains,
    "absent": absent,
    "starts": starts,
    "ends": ends,
    "keyword_words": keyword,
    "upper_and_lowercase": upper_start_and_lowercase,
    "concise": concise,
    "asks_back": asks_back,
    "no_lists": no_lists,
    "enthusiastic": enthusiastic,
}

# judge name -> --judge-args, for the tiny preset: one of each kind.
TINY_SUITE: dict[str, str] = {
    "lowercase": "",  # a share of a character class (judges.lowercase): 33.9%
    "contains": "",
    "absent": "",
    "length": "target=28,width=2",  # a target length in characters (judges.length): 26.7%
    "starts": "",
    "ends": "",
    "keyword_words": "",
    "upper_and_lowercase": "",
}

# judge name -> --judge-args, for real chat models (SmolLM2-135M-Instruct).
REAL_TEXT_SUITE: dict[str, str] = {
    "concise": "",
    "asks_back": "",
    "no_lists": "",
    "enthusiastic": "",
}
