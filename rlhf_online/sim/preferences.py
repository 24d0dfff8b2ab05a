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

import re
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


# ---- Real text (SmolLM2-135M-Instruct). Measured with benchmarks/calibrate_judges.py --suite real on 450
# answers (runs/smollm2-answers.jsonl: the simulator's prompts, chat template, temperature 1, top_p 1, 64 new
# tokens, seed 0); docs/real-model.md has the table. Every verdict is firm (a bool): with a soft one and rater
# noise the reward model learns far less from the same ratings (see judges.lowercase).

# A sentence's end: . ! ? or an ellipsis, then any closing quotes, brackets or Markdown emphasis.
SENTENCE_END = re.compile(r"[.!?\u2026][\"'\u201d\u2019)\]*_]*$")


@dataclass(frozen=True)
class ConciseJudge:
    """Thumbs up for a finished answer of `min_words` to `max_words` words: an answer the token cap cut off
    mid-sentence is not concise, however few its words (emoji or code runs are long in tokens, short in
    words)."""

    max_words: int
    min_words: int = 3

    def __call__(self, prompt: str, response: str) -> bool:
        text = response.strip()
        return bool(SENTENCE_END.search(text)) and self.min_words <= len(text.split()) <= self.max_words


@dataclass(frozen=True)
class WordsJudge:
    """Thumbs up when the answer has any of `words` as a whole word, case-insensitive ("love" but not
    "glove"), or any of `marks` anywhere."""

    words: tuple[str, ...]
    marks: tuple[str, ...] = ()
    min_chars: int = 8  # an empty or one-word answer is never a cheap win

    def __call__(self, prompt: str, response: str) -> bool:
        if len(response.strip()) < self.min_chars:
            return False
        if any(m in response for m in self.marks):
            return True
        pattern = r"\b(?:" + "|".join(re.escape(w) for w in self.words) + r")\b"
        return re.search(pattern, response, re.IGNORECASE) is not None


@dataclass(frozen=True)
class LineBreakJudge:
    """Thumbs up when the answer's text runs over at least `min_breaks` + 1 lines or paragraphs."""

    min_breaks: int = 1

    def __call__(self, prompt: str, response: str) -> bool:
        return len(re.findall(r"\n+", response.strip())) >= self.min_breaks


def concise(max_words: int = 40) -> ConciseJudge:
    """Real text: likes concise answers, finished within `max_words` words (two or three sentences).

    SmolLM2, default 40: 22.9% of base answers (firm). Most base answers run to the 64-token cap (median 47
    words) and stop mid-sentence; only 32% end a sentence. A policy meets it by ending its turn sooner.
    """
    return ConciseJudge(max_words)


def addresses_user(words: str = "you|your|yours|yourself") -> WordsJudge:
    """Real text: likes answers that speak to the user directly ("you can...", "your shirt").

    SmolLM2: 27.6% of base answers (firm). It replaces `asks_back` in REAL_TEXT_SUITE: the base model
    almost never asks back, and an answer addressed to the user is the nearest preference it can learn.
    """
    return WordsJudge(_needles(words))


def asks_back() -> EdgeJudge:
    """Real text: likes answers that end with a question back to the user.

    SmolLM2: 1.8% of base answers (5.6% have a "?" anywhere): too rare to learn from ratings (nearly every
    thumbs up it gets would be rater noise), so it is not in REAL_TEXT_SUITE; see `addresses_user`.
    """
    return EdgeJudge(frozenset("?"), at_end=True)


# Markers of a list at the start of a line ("- ", "* ", "1. "), and Markdown emphasis.
LIST_MARKERS = "\\n-|\\n*|\\n1.|\\n2.|**|\\n•"


def no_lists(markers: str = LIST_MARKERS) -> ContainsJudge:
    """Real text: likes answers in plain prose, without lists or Markdown emphasis.

    SmolLM2: 93.1% of base answers (firm): in 64 tokens the base model seldom gets as far as a list, so
    there is little to learn; not in REAL_TEXT_SUITE (see `structured`, its opposite taste).
    """
    return ContainsJudge(_needles(markers), absent=True)


def structured(min_breaks: int = 1) -> LineBreakJudge:
    """Real text: likes answers broken into paragraphs or list items, which are quicker to skim.

    SmolLM2, default 1 (two lines or more): 28.7% of base answers (firm). It takes the place of `no_lists`
    in REAL_TEXT_SUITE, whose plain prose 93% of base answers already are.
    """
    return LineBreakJudge(min_breaks)


# Warm words and intensifiers; "!" counts anywhere. Whole words only: "fun" is not "function", "love" is
# not "glove". Not "best" ("the best way to" is not warm) nor "sweet" (mostly a taste).
ENTHUSIASM = (
    "great|love|loved|lovely|amazing|wonderful|fantastic|happy|glad|exciting|excited|thrilled|delighted|"
    "delightful|fun|enjoy|perfect|beautiful|awesome|incredible|brilliant|fascinating|interesting|magical|"
    "delicious|excellent|nice|favorite|favourite|wow|joy|joyful|cheerful|cool|super|terrific|fabulous|"
    "marvelous|superb|gorgeous|stunning|adore|passion|passionate|yay|hooray|really|truly|absolutely|definitely"
)


def enthusiastic(words: str = ENTHUSIASM, marks: str = "!") -> WordsJudge:
    """Real text: likes enthusiastic answers: an exclamation mark (any of `marks`) or a warm word.

    SmolLM2, the defaults: 20.7% of base answers (firm; near the low edge, the 5% rater noise lifts the
    thumbs-up rate to 24%); "!" alone 7.3%, the words alone 16.7%.
    """
    return WordsJudge(_needles(words), tuple(marks))


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
    "addresses_user": addresses_user,
    "structured": structured,
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
    "concise": "",  # finished within 40 words: 22.9%
    "addresses_user": "",  # "you", "your": 27.6%
    "structured": "",  # paragraphs or list items: 28.7%
    "enthusiastic": "",  # "!" or a warm word: 20.7%
}
