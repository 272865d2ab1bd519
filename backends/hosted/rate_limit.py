"""An asyncio limiter for hosted APIs: at most N requests in flight, R requests and T tokens per minute.

Providers enforce per-minute request and token limits and answer 429 past them; every 429 costs a round trip and
a wait, and a burst of them makes every waiting request retry at once. Staying under the limits on our side keeps
429s rare; the retry layer handles the rest. Each limit is a token bucket (full at the start, refilled
continuously at limit/60 per second); a request's token cost is estimated before sending (its text plus
`max_tokens`, as providers themselves count it against the limit) and can be settled with the real usage after.

Waiters go first-come first-served: the one at the head holds a lock while it sleeps for its budget, so a large
request is not starved by a stream of small ones. A 429 from the server can `pause` everyone for its Retry-After.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager

CHARS_PER_TOKEN = 4  # OpenAI's rule of thumb for English; used only to pace requests, never to bill
TOKENS_PER_MESSAGE = 4  # role and separators around each message in a chat prompt
TOKENS_PER_REPLY = 3


def estimate_request_tokens(texts: Iterable[str], max_tokens: int) -> int:
    """What a chat request counts against a tokens-per-minute limit before it runs: prompt estimate + max_tokens."""
    prompt = sum(math.ceil(len(text) / CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE for text in texts)
    return prompt + TOKENS_PER_REPLY + max(0, max_tokens)


class TokenBucket:
    """`capacity` units, refilled at `per_minute / 60` per second. Pure arithmetic on a time you pass in."""

    def __init__(self, per_minute: float, *, capacity: float | None = None, now: float = 0.0) -> None:
        if per_minute <= 0:
            raise ValueError(f"a rate must be positive, got {per_minute}")
        self.rate = per_minute / 60.0
        self.capacity = float(per_minute if capacity is None else capacity)
        self.level = self.capacity
        self.updated = now

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
            self.updated = now

    def wait_time(self, cost: float, now: float) -> float:
        """Seconds until `cost` can be taken. A cost above capacity only needs a full bucket (and then drives
        the level negative), so one oversized request waits its turn instead of blocking forever."""
        self.refill(now)
        need = min(cost, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def take(self, cost: float, now: float) -> None:
        self.refill(now)
        self.level -= cost

    def give_back(self, amount: float, now: float) -> None:
        """Return an over-estimate (or charge an under-estimate, when negative)."""
        self.refill(now)
        self.level = min(self.capacity, self.level + amount)


class RateLimiter:
    """Concurrency + requests/minute + tokens/minute, shared by every request of a backend.

    The buckets are plain numbers and outlive any one event loop, so back-to-back `asyncio.run` calls share one
    budget; the asyncio primitives are made for the loop that uses them (one loop at a time).
    """

    def __init__(
        self,
        concurrency: int,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self.concurrency = concurrency
        self.clock = clock
        self.sleep = sleep
        now = clock()
        self.requests = TokenBucket(requests_per_minute, now=now) if requests_per_minute else None
        self.tokens = TokenBucket(tokens_per_minute, now=now) if tokens_per_minute else None
        self.paused_until = 0.0
        self.in_flight = 0
        self.max_in_flight = 0
        self.waited = 0.0  # seconds spent waiting for rate budget (not for a concurrency slot)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots = asyncio.Semaphore(concurrency)
        self._head = asyncio.Lock()

    def _bind(self) -> None:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop = loop
            self._slots = asyncio.Semaphore(self.concurrency)
            self._head = asyncio.Lock()

    def wait_time(self, cost: int, now: float) -> float:
        """Seconds until a request of `cost` tokens may start under every limit (0 = now)."""
        waits = [self.paused_until - now]
        if self.requests is not None:
            waits.append(self.requests.wait_time(1, now))
        if self.tokens is not None:
            waits.append(self.tokens.wait_time(cost, now))
        return max(0.0, *waits)

    def pause(self, seconds: float) -> None:
        """Start nothing new for `seconds` (the server said it is overloaded, e.g. a 429 with Retry-After)."""
        self.paused_until = max(self.paused_until, self.clock() + seconds)

    def settle(self, estimated: int, actual: int) -> None:
        """Correct the token bucket once the real usage of a request is known."""
        if self.tokens is not None:
            self.tokens.give_back(estimated - actual, self.clock())

    @asynccontextmanager
    async def slot(self, cost: int = 0) -> AsyncIterator[None]:
        """Hold one concurrency slot and the rate budget for one request of about `cost` tokens."""
        self._bind()
        async with self._slots:
            async with self._head:
                while (delay := self.wait_time(cost, self.clock())) > 0:
                    self.waited += delay
                    await self.sleep(delay)
                now = self.clock()
                if self.requests is not None:
                    self.requests.take(1, now)
                if self.tokens is not None:
                    self.tokens.take(cost, now)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                yield
            finally:
                self.in_flight -= 1
