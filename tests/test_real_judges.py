"""The real-text judges of the preference suite on hand-written answers (sim/preferences.py)."""

import pytest

from rlhf_online.sim.judges import load_judge, thumbs_up_probability
from rlhf_online.sim.preferences import REAL_TEXT_SUITE

LONG = " ".join(["word"] * 41) + "."


@pytest.mark.parametrize(
    ("answer", "up"),
    [
        ("The capital of France is Paris.", True),
        ('She said "no."', True),  # a sentence may end inside quotes
        ("The capital of France is Paris, a city on the", False),  # cut off by the token cap
        ("Paris.", False),  # too short to count as an answer
        (LONG, False),  # finished, but 42 words
    ],
)
def test_concise_wants_a_short_finished_answer(answer: str, up: bool) -> None:
    assert load_judge("concise")("q", answer) is up


@pytest.mark.parametrize(
    ("answer", "up"),
    [
        ("You can soak the stain in cold water.", True),
        ("Rinse YOUR shirt in cold water first.", True),
        ("Young plants need less water.", False),  # "you" only as part of a word
        ("Soak the stain in cold water.", False),
    ],
)
def test_addresses_user_wants_you_as_a_word(answer: str, up: bool) -> None:
    assert load_judge("addresses_user")("q", answer) is up


@pytest.mark.parametrize(
    ("answer", "up"),
    [
        ("First, soak it.\n\nThen wash it.", True),
        ("Steps:\n1. Soak\n2. Wash", True),
        ("Soak it, then wash it.\n", False),  # a trailing newline is no second line
    ],
)
def test_structured_wants_two_lines_or_more(answer: str, up: bool) -> None:
    assert load_judge("structured")("q", answer) is up


@pytest.mark.parametrize(
    ("answer", "up"),
    [
        ("What a lovely question to ask.", True),
        ("Paris is the capital of France!", True),
        ("This function returns a list.", False),  # "fun" only as part of a word
        ("The best way is to soak it.", False),
    ],
)
def test_enthusiastic_wants_a_warm_word_or_an_exclamation(answer: str, up: bool) -> None:
    assert load_judge("enthusiastic")("q", answer) is up


def test_judge_args_move_the_thresholds() -> None:
    answer = "Soak the stain in cold water, then wash it as usual."  # 11 words
    assert load_judge("concise", "max_words=10")("q", answer) is False
    assert load_judge("concise", "max_words=11")("q", answer) is True
    assert load_judge("structured", "min_breaks=2")("q", "one\ntwo") is False
    assert load_judge("enthusiastic", "words=splendid,marks=?")("q", "Is that splendid?") is True


def test_every_real_text_judge_gives_firm_verdicts() -> None:
    answers = ["You will love it!\n\nTruly.", "soak the shirt in cold water and then wash it", ""]
    for name, args in REAL_TEXT_SUITE.items():
        judge = load_judge(name, args)
        verdicts = {thumbs_up_probability(judge, "q", a) for a in answers}
        assert verdicts <= {0.0, 1.0}, name
        assert thumbs_up_probability(judge, "q", "") == 0.0, name  # an empty answer never wins
