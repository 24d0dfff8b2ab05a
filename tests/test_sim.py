"""Judges, prompt file, and the simulator loop against a fake ChatService on a real grpc.aio server."""

import asyncio
import json
import random
import string
import sys
import textwrap

import grpc
import pytest

from rlhf_online.proto.rlhf.v1 import chat_pb2, chat_pb2_grpc
from rlhf_online.sim import judges
from rlhf_online.sim.config import SimulateConfig
from rlhf_online.sim.simulate import Outcome, Simulator, Summary, load_prompts, main, simulate

# ---------------------------------------------------------------------------------------------------- judges


def test_char_share():
    assert judges.char_share("abcD", string.ascii_lowercase) == 0.75
    assert judges.char_share("", "a") == 0.0


def test_lowercase_judge_prefers_lowercase_and_refuses_short_answers():
    judge = judges.load_judge("lowercase")
    assert judge("", "all of these words are lowercase") > 0.99
    assert judge("", "ALL OF THESE WORDS ARE UPPERCASE") < 0.01
    assert judge("", "abc") == 0.0  # shorter than min_chars: never a cheap win


def test_lowercase_judge_starts_low_on_uniform_random_text():
    # The tiny model starts near uniform over printable ASCII; the default threshold puts P(up) near 20%.
    rng = random.Random(0)
    alphabet = string.printable[:95]
    judge = judges.load_judge("lowercase")
    p = [judge("", "".join(rng.choice(alphabet) for _ in range(48))) for _ in range(2000)]
    assert 0.1 < sum(p) / len(p) < 0.3


def test_builtin_judges_and_options():
    assert judges.load_judge("vowels")("", "aeiou aeiou aeiou") > 0.99
    assert judges.load_judge("charclass", "chars=xyz,threshold=0.5")("", "xyzxyzxyzxyz") > 0.99
    assert judges.load_judge("length", "target=10,width=2")("", "x" * 10) == 1.0
    assert judges.load_judge("length", "target=10,width=2")("", "x" * 30) < 1e-6
    keyword = judges.load_judge("keyword", "words=cat|dog,base=0")
    assert keyword("", "I like my Cat") == 1.0
    assert keyword("", "I like my fish") == 0.0


def test_judge_errors_say_what_to_do():
    with pytest.raises(ValueError, match="unknown judge"):
        judges.load_judge("nope")
    with pytest.raises(ValueError, match="no option"):
        judges.load_judge("lowercase", "colour=red")
    with pytest.raises(ValueError, match="not key=value"):
        judges.load_judge("lowercase", "threshold")
    with pytest.raises(ValueError, match="not a valid float"):
        judges.load_judge("lowercase", "threshold=high")
    with pytest.raises(ValueError, match="cannot import"):
        judges.load_judge("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="no callable"):
        judges.load_judge("string:nothing_here")


def test_custom_judge_from_module(tmp_path, monkeypatch):
    (tmp_path / "my_judges.py").write_text(
        textwrap.dedent("""
        def likes_cats(prompt, response):
            return "cat" in response
        """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    judge = judges.load_judge("my_judges:likes_cats")
    assert judges.thumbs_up_probability(judge, "p", "a cat") == 1.0
    assert judges.thumbs_up_probability(judge, "p", "a dog") == 0.0
    sys.modules.pop("my_judges", None)


def test_thumbs_up_probability_clamps_and_rejects_nan():
    assert judges.thumbs_up_probability(lambda p, r: 1.5, "", "") == 1.0
    assert judges.thumbs_up_probability(lambda p, r: -1, "", "") == 0.0
    with pytest.raises(ValueError, match="probability"):
        judges.thumbs_up_probability(lambda p, r: float("nan"), "", "")


def test_noisy_rater():
    assert judges.noisy(1.0, 0.1) == pytest.approx(0.9)
    assert judges.noisy(0.0, 0.1) == pytest.approx(0.1)
    assert judges.noisy(0.3, 0.5) == pytest.approx(0.5)


# --------------------------------------------------------------------------------------------------- prompts


def test_builtin_prompt_file_has_a_few_hundred_distinct_prompts():
    prompts = load_prompts()
    assert len(prompts) >= 200
    assert len(set(prompts)) == len(prompts)
    assert not any(p.startswith("#") for p in prompts)
    assert any("\n" in p for p in prompts)  # "\n" escapes become newlines


def test_prompt_file_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(empty)
    assert load_prompts(_write(tmp_path / "p.txt", "one\n# two\nthree\n")) == ["one", "three"]


def _write(path, text):
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------------- simulator


class FakeChat(chat_pb2_grpc.ChatServiceServicer):
    """Answers in lowercase from v000002 on; records ratings; refuses the first rating of each user once."""

    def __init__(self, *, swap_after: int = 20, refuse_first: bool = True) -> None:
        self.served = 0
        self.swap_after = swap_after
        self.refuse_first = refuse_first
        self.refused_users: set[str] = set()
        self.feedback: list[chat_pb2.FeedbackRequest] = []
        self.requests: list[chat_pb2.ChatRequest] = []

    def _answer(self, request: chat_pb2.ChatRequest) -> tuple[str, str, str]:
        self.served += 1
        self.requests.append(request)
        version = "v000001" if self.served <= self.swap_after else "v000002"
        text = "SOME UPPERCASE ANSWER" if version == "v000001" else "a nice lowercase answer"
        return f"r{self.served}.{version}", text, version

    async def Chat(self, request, context):
        response_id, text, version = self._answer(request)
        return chat_pb2.ChatResponse(
            response_id=response_id,
            text=text,
            model_version=version,
            usage=chat_pb2.Usage(completion_tokens=len(text)),
            finish_reason="stop",
        )

    async def ChatStream(self, request, context):
        response_id, text, version = self._answer(request)
        for i in range(0, len(text), 5):
            yield chat_pb2.ChatChunk(text=text[i : i + 5])
        yield chat_pb2.ChatChunk(
            response_id=response_id,
            model_version=version,
            finish_reason="stop",
            usage=chat_pb2.Usage(completion_tokens=len(text)),
        )

    async def SubmitFeedback(self, request, context):
        if request.response_id == "r3.v000001":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "not retried: this is a client error")
        if self.refuse_first and request.user_id not in self.refused_users:
            self.refused_users.add(request.user_id)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "rate limit; retry later")
        self.feedback.append(request)
        return chat_pb2.FeedbackResponse(event_id=f"e-{request.response_id}")


@pytest.fixture
async def fake_chat():
    servicer = FakeChat()
    server = grpc.aio.server()
    chat_pb2_grpc.add_ChatServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(None)


def _config(target: str, **overrides) -> SimulateConfig:
    values = dict(
        target=target,
        judge="lowercase",
        rater_noise=0.0,
        concurrency=3,
        users=5,
        duration_s=0,
        max_requests=60,
        seed=1,
        stream_share=0.5,
        feedback_deadline_s=10,
        chat_deadline_s=10,
    )
    values.update(overrides)
    return SimulateConfig(**values)


async def test_simulator_rates_every_answer_and_counts_per_version(fake_chat):
    servicer, target = fake_chat
    outcomes: list[Outcome] = []
    async with grpc.aio.insecure_channel(target) as channel:
        sim = Simulator(
            channel,
            load_prompts(),
            judges.load_judge("lowercase"),
            _config(target),
            on_outcome=outcomes.append,
        )
        summary = await sim.run()

    assert summary.requests == len(outcomes) == 60 == servicer.served
    assert {o.stream for o in outcomes} == {True, False}  # both Chat and ChatStream were used
    assert len({r.user_id for r in servicer.requests}) > 1
    v1, v2 = summary.versions["v000001"], summary.versions["v000002"]
    assert v1.served + v2.served == 60
    # Without rater noise the judge is firm: uppercase answers get down, lowercase ones up.
    assert v1.up_rate == 0.0 and v2.up_rate == 1.0
    # Every rating but the one the server refused with INVALID_ARGUMENT was acknowledged (after retries).
    acked = [o for o in outcomes if o.acknowledged]
    assert len(acked) == 59 and summary.rated == 59 and summary.feedback_refused == 1
    assert sorted(o.response_id for o in acked) == sorted(f.response_id for f in servicer.feedback)
    assert all(o.event_id == f"e-{o.response_id}" for o in acked)
    refused = next(o for o in outcomes if o.rating and not o.acknowledged)
    assert refused.error.startswith("SubmitFeedback INVALID_ARGUMENT")
    for o in acked:  # the streamed text was put together in full
        assert o.text in ("SOME UPPERCASE ANSWER", "a nice lowercase answer")
    assert "v000001" in summary.table() and "v000002" in summary.table()


async def test_simulator_noise_and_rated_share(fake_chat):
    servicer, target = fake_chat
    servicer.swap_after = 10**9  # v000001 only: the judge always says down
    servicer.refuse_first = False
    config = _config(target, rater_noise=0.3, rated_share=0.5, max_requests=400, concurrency=4, seed=7)
    async with grpc.aio.insecure_channel(target) as channel:
        summary = await Simulator(channel, ["q"], judges.load_judge("lowercase"), config).run()
    stats = summary.versions["v000001"]
    assert stats.served == 400
    assert 150 < stats.rated < 250  # about half rated
    assert 0.2 < stats.up_rate < 0.4  # the noisy raters vote up about 30% of the time


async def test_simulator_stops_on_event_and_duration(fake_chat):
    _, target = fake_chat
    stop = asyncio.Event()
    count = 0

    def on_outcome(_):
        nonlocal count
        count += 1
        if count == 5:
            stop.set()

    async with grpc.aio.insecure_channel(target) as channel:
        config = _config(target, max_requests=0, duration_s=0)
        summary = await Simulator(
            channel, ["q"], judges.load_judge("lowercase"), config, on_outcome=on_outcome
        ).run(stop)
        assert 5 <= summary.requests <= 5 + config.concurrency
        paced = _config(target, max_requests=0, duration_s=0.5, rate=10.0, concurrency=2)
        summary = await Simulator(channel, ["q"], judges.load_judge("lowercase"), paced).run()
        assert 1 <= summary.requests <= 6  # 10 per second for half a second


async def test_simulator_records_unavailable_server():
    config = _config("127.0.0.1:1", max_requests=3, concurrency=1, chat_deadline_s=1)
    async with grpc.aio.insecure_channel(config.target) as channel:
        summary = await Simulator(channel, ["q"], judges.load_judge("lowercase"), config).run()
    assert summary.requests == 3 and not summary.versions
    assert sum(summary.errors.values()) == 3
    assert all(k.split()[0] in ("Chat", "ChatStream") for k in summary.errors)


async def test_simulate_writes_outcomes_and_summary(fake_chat, tmp_path):
    _, target = fake_chat
    config = _config(
        target,
        max_requests=12,
        outcomes_path=str(tmp_path / "out.jsonl"),
        summary_path=str(tmp_path / "summary.json"),
    )
    summary = await simulate(config)
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and {"model_version", "rating", "acknowledged", "p_up"} <= set(lines[0])
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["requests"] == 12 == summary.requests


def test_summary_counts_errors_without_version():
    summary = Summary()
    summary.add(
        Outcome(index=0, user_id="u", prompt="p", stream=False, started_ms=0, error="Chat UNAVAILABLE: x")
    )
    assert summary.errors == {"Chat UNAVAILABLE": 1} and not summary.versions


def test_simulate_command_rejects_bad_judge(capsys):
    assert main(["--judge", "nope", "--max-requests", "1"], {}) == 2
    assert "unknown judge" in capsys.readouterr().err


def test_config_validation():
    with pytest.raises(ValueError, match="rater_noise"):
        SimulateConfig(rater_noise=0.7)
    with pytest.raises(ValueError, match="rated_share"):
        SimulateConfig(rated_share=0)
