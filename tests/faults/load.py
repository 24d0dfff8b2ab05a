"""The load driver of the fault matrix: concurrent chat-and-rate clients over real gRPC channels, with a
ledger of everything the services told them.

Each client chats, then rates the answer at once (the worst case for the interaction-before-rating order),
on the replica `rate_on` picks; a rating that gets UNAVAILABLE or DEADLINE_EXCEEDED is retried, as a client
app would, for up to `retry_for_s`. Counts are bounded (`max_chats` answers, `max_ratings` ratings; a failed
chat is paced), and every RPC has a deadline.

    driver = LoadDriver({"a": proc}, clients=4, max_ratings=200)
    task = asyncio.create_task(driver.run())
    await driver.ledger.wait_for(lambda seen: seen.oks("rating") >= 20, 60, "20 acknowledged ratings")
    driver.stop()
    ledger = await task
"""

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import grpc

from rlhf_online.inference.signing import feedback_event_id
from rlhf_online.proto.rlhf.v1 import chat_pb2, chat_pb2_grpc
from tests.faults.cluster import Proc

PROMPTS = (
    "Tell me about rivers.",
    "What is a good name for a cat?",
    "Write one line about the sea.",
    "How do birds fly?",
    "Say something kind.",
    "What is the capital of France?",
    "Describe a quiet morning.",
    "Why is the sky blue?",
)
RETRIED = ("UNAVAILABLE", "DEADLINE_EXCEEDED")
MAX_PENDING = 4  # ratings one client has under way at most
CHANNEL_OPTIONS = (  # reconnect quickly to a restarted process (gRPC's default backoff grows to 120 s)
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


@dataclass
class ChatCall:
    """One Chat as the client saw it."""

    replica: str  # the process that was asked ("a#1")
    code: str
    latency_s: float
    started_s: float  # time.monotonic() at the call
    response_id: str = ""
    model_version: str = ""


@dataclass
class Rating:
    """One rating of one answer by one user, over all its attempts."""

    response_id: str
    user_id: str
    served_by: str  # the process that answered ("a#1")
    second_vote: bool = False  # the same user's vote again, on another replica
    codes: list[str] = field(default_factory=list)  # status of each attempt, in order
    tried_on: list[str] = field(default_factory=list)  # the process asked at each attempt
    sent_s: list[float] = field(default_factory=list)  # time.monotonic() at each attempt
    took_s: list[float] = field(default_factory=list)  # how long each attempt took
    accepted_by: str = ""  # the process that answered OK
    last_error: str = ""  # the status details of the last failed attempt

    @property
    def ok(self) -> bool:
        return bool(self.codes) and self.codes[-1] == "OK"

    @property
    def event_id(self) -> str:
        return feedback_event_id(self.response_id, self.user_id)


@dataclass
class Ledger:
    """What the clients were told; `wait_for` wakes on every entry."""

    chats: list[ChatCall] = field(default_factory=list)
    ratings: list[Rating] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    unrated: int = 0  # answers not rated: their client had MAX_PENDING ratings under way
    calls_in_flight: Counter = field(default_factory=Counter)  # "chat" / "rating" -> calls under way

    def oks(self, what: str) -> int:
        if what == "chat":
            return sum(c.code == "OK" for c in self.chats)
        return sum(r.ok for r in self.ratings)

    def in_flight(self, what: str) -> int:
        """Calls sent and not answered yet, of Chat or of SubmitFeedback."""
        return self.calls_in_flight[what]

    def accepted_by(self, tag: str) -> int:
        """Ratings that process `tag` ("a#2") answered OK."""
        return sum(r.accepted_by == tag for r in self.ratings)

    def codes(self, what: str) -> Counter:
        """Status code -> count, of every Chat, or of every rating attempt."""
        if what == "chat":
            return Counter(c.code for c in self.chats)
        return Counter(code for r in self.ratings for code in r.codes)

    async def note(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def more_oks(self, n: int, timeout_s: float) -> None:
        """Until `n` more ratings got OK than have now."""
        target = self.oks("rating") + n
        await self.wait_for(lambda seen: seen.oks("rating") >= target, timeout_s, f"{n} more OK ratings")

    async def wait_for(self, predicate: Callable[["Ledger"], bool], timeout_s: float, what: str) -> None:
        """Until `predicate(ledger)` holds; TimeoutError naming `what` and the figures so far."""
        try:
            async with asyncio.timeout(timeout_s), self.changed:
                await self.changed.wait_for(lambda: predicate(self))
        except TimeoutError:
            raise TimeoutError(
                f"no {what} within {timeout_s:.0f}s; chats {dict(self.codes('chat'))}, rating attempts "
                f"{dict(self.codes('rating'))}"
            ) from None


class LoadDriver:
    """`clients` concurrent users chatting with the replicas of `procs` and rating each answer.

    Args:
        procs: replica name -> its process (the address; its incarnation is read at each answer).
        chat_on: (client, n) -> the replica that answers a client's n-th chat; default round robin.
        rate_on: the answering replica -> the replica the rating goes to; default the same.
        second_vote_every: every k-th rating is voted again by the same user on the next replica (0: never).
        think_s: a client's pause after each rated answer (0: the next chat at once).
    """

    def __init__(
        self,
        procs: Mapping[str, Proc],
        *,
        clients: int = 4,
        max_chats: int = 1000,
        max_ratings: int = 300,
        seed: int = 0,
        chat_on: Callable[[int, int], str] | None = None,
        rate_on: Callable[[str], str] | None = None,
        second_vote_every: int = 0,
        think_s: float = 0.0,
        chat_timeout_s: float = 30.0,
        rating_timeout_s: float = 5.0,
        retry_for_s: float = 60.0,
    ) -> None:
        self.procs, self.clients, self.seed = dict(procs), clients, seed
        self.max_chats, self.max_ratings = max_chats, max_ratings
        names = sorted(self.procs)
        self.chat_on = chat_on or (lambda i, n: names[(i + n) % len(names)])
        self.rate_on = rate_on or (lambda name: name)
        self.second_vote_every, self.think_s = second_vote_every, think_s
        self.chat_timeout_s, self.rating_timeout_s, self.retry_for_s = (
            chat_timeout_s,
            rating_timeout_s,
            retry_for_s,
        )
        self.ledger = Ledger()
        self._stop = asyncio.Event()
        self._stubs: dict[str, chat_pb2_grpc.ChatServiceStub] = {}

    def stop(self) -> None:
        """No new chats; ratings under way finish their retries."""
        self._stop.set()

    async def run(self) -> Ledger:
        channels = {
            n: grpc.aio.insecure_channel(p.address, options=CHANNEL_OPTIONS) for n, p in self.procs.items()
        }
        self._stubs = {name: chat_pb2_grpc.ChatServiceStub(ch) for name, ch in channels.items()}
        try:
            await asyncio.gather(*(self._client(i) for i in range(self.clients)))
        finally:
            for channel in channels.values():
                await channel.close()
        return self.ledger

    async def _client(self, i: int) -> None:
        """Chats on, rating each answer in a task of its own, so chat load goes on while ratings retry
        through an outage; beyond `MAX_PENDING` ratings under way (or `max_ratings` in all), an answer goes
        unrated."""
        rng = random.Random(self.seed * 1000 + i)
        pending: set[asyncio.Task] = set()
        n = 0
        while not self._stop.is_set() and self.ledger.oks("chat") < self.max_chats:
            replica = self.chat_on(i, n)
            chat = await self._chat(replica, rng)
            n += 1
            if chat.code != "OK":
                await asyncio.sleep(0.5)  # the replica is down or busy: pace the next try
                continue
            if len(pending) >= MAX_PENDING or len(self.ledger.ratings) >= self.max_ratings:
                self.ledger.unrated += 1
                if pending:  # a user who cannot rate yet reads a while before asking again
                    await asyncio.wait(pending, timeout=0.5)
                continue
            rating = Rating(chat.response_id, f"user-{i}-{n}", chat.replica)
            again = bool(self.second_vote_every) and n % self.second_vote_every == 0
            value = rng.choice((chat_pb2.THUMBS_UP, chat_pb2.THUMBS_DOWN))
            task = asyncio.create_task(self._vote(rating, replica, value, again))
            pending.add(task)
            task.add_done_callback(pending.discard)
            if self.think_s:
                await asyncio.sleep(self.think_s)  # the user reads the answer before the next question
        await asyncio.gather(*pending)

    async def _vote(self, rating: Rating, replica: str, value: int, again: bool) -> None:
        """Rates an answer; if `again` and it got OK, the same user votes once more on the next replica."""
        rated_on = self.rate_on(replica)
        await self._rate(rating, rated_on, value)
        if again and rating.ok:
            second = Rating(rating.response_id, rating.user_id, rating.served_by, second_vote=True)
            await self._rate(second, self._next_replica(rated_on), value)

    def _next_replica(self, name: str) -> str:
        names = sorted(self.procs)
        return names[(names.index(name) + 1) % len(names)]

    async def _chat(self, replica: str, rng: random.Random) -> ChatCall:
        request = chat_pb2.ChatRequest(
            messages=[chat_pb2.Message(role="user", content=rng.choice(PROMPTS))],
            user_id="load",
            params=chat_pb2.GenerationParams(max_new_tokens=8),
        )
        start = time.monotonic()
        try:
            async with self._calling("chat"):
                reply = await self._stubs[replica].Chat(request, timeout=self.chat_timeout_s)
            tag = self.procs[replica].tag  # read at the answer: no answer comes from a later incarnation
            call = ChatCall(
                tag, "OK", time.monotonic() - start, start, reply.response_id, reply.model_version
            )
        except grpc.aio.AioRpcError as e:
            call = ChatCall(self.procs[replica].tag, e.code().name, time.monotonic() - start, start)
        self.ledger.chats.append(call)
        await self.ledger.note()
        return call

    @contextlib.asynccontextmanager
    async def _calling(self, what: str):
        """Counts the call in flight while it runs; waiters see it start."""
        self.ledger.calls_in_flight[what] += 1
        await self.ledger.note()
        try:
            yield
        finally:
            self.ledger.calls_in_flight[what] -= 1

    async def _rate(self, rating: Rating, replica: str, value: int) -> None:
        """Sends the rating, retrying UNAVAILABLE and DEADLINE_EXCEEDED for up to `retry_for_s`."""
        self.ledger.ratings.append(rating)
        request = chat_pb2.FeedbackRequest(
            response_id=rating.response_id, rating=value, user_id=rating.user_id
        )
        give_up = time.monotonic() + self.retry_for_s
        while True:
            rating.tried_on.append(self.procs[replica].tag)
            rating.sent_s.append(time.monotonic())
            try:
                async with self._calling("rating"):
                    await self._stubs[replica].SubmitFeedback(request, timeout=self.rating_timeout_s)
                rating.codes.append("OK")
                rating.accepted_by = self.procs[replica].tag
            except grpc.aio.AioRpcError as e:
                rating.codes.append(e.code().name)
                rating.last_error = e.details() or ""
            rating.took_s.append(time.monotonic() - rating.sent_s[-1])
            await self.ledger.note()
            if rating.codes[-1] not in RETRIED or time.monotonic() > give_up:
                return
            await asyncio.sleep(0.3)
