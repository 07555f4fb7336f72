"""A client for any OpenAI-compatible ``/v1/chat/completions`` server, built for long, flaky runs.

* Retries with exponential backoff and full jitter on 429, 5xx, time-outs, dropped connections and
  malformed bodies; honours ``Retry-After``.
* Fails at once, with a clear :class:`TeacherError`, on what retrying cannot fix: 401/403 (key),
  400/404/422 (model name, request shape).
* A per-run request budget counts every HTTP attempt, retries included.
* A server that stops answering altogether (many connection failures in a row) ends the run with
  an error instead of retrying forever; what was stored stays stored.
* The API key is read from an environment variable, sent only in the ``Authorization`` header, and
  never logged, stored or put into an error message.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from kpod.errors import TeacherError

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524})


class BudgetExhausted(Exception):
    """The run's request budget is spent; remaining samples are left for a re-run."""


class RetriesExhausted(Exception):
    """One request failed on every attempt; the sample is skipped and counted."""


@dataclass
class Completion:
    """One chat completion: its text and what the server reported about it."""

    text: str
    finish_reason: str | None
    usage: dict[str, int]
    model: str
    latency_s: float
    attempts: int


@dataclass
class RetryPolicy:
    """Exponential backoff with full jitter: sleep ~ U(0, min(cap, base * 2**attempt))."""

    max_retries: int = 6
    base_s: float = 0.5
    cap_s: float = 30.0
    timeout_s: float = 120.0
    max_consecutive_connection_failures: int = 30

    def delay(self, attempt: int, rng: random.Random, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return min(self.cap_s, max(0.0, retry_after))
        return rng.uniform(0, min(self.cap_s, self.base_s * 2**attempt))


@dataclass
class ClientStats:
    requests: int = 0
    retries: int = 0
    failures_by_reason: dict[str, int] = field(default_factory=dict)

    def count(self, reason: str) -> None:
        self.failures_by_reason[reason] = self.failures_by_reason.get(reason, 0) + 1


def api_key_from_env(var: str | None) -> str | None:
    """The API key in environment variable ``var`` (``None`` if no variable is named)."""
    if not var:
        return None
    key = os.environ.get(var)
    if not key:
        raise TeacherError(f"environment variable {var} (the API key) is not set or empty")
    return key


class ChatClient:
    """Async client for ``POST {base_url}/chat/completions``.

    ``base_url`` is the API root, e.g. ``http://127.0.0.1:8000/v1`` or ``https://api.openai.com/v1``.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        policy: RetryPolicy | None = None,
        max_requests: int | None = None,
        seed: int = 0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.policy = policy or RetryPolicy()
        self.max_requests = max_requests
        self.stats = ClientStats()
        self._rng = random.Random(seed)
        self._consecutive_connection_failures = 0
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.AsyncClient(
            headers=headers, timeout=httpx.Timeout(self.policy.timeout_s), transport=transport
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> ChatClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _take_request(self) -> None:
        if self.max_requests is not None and self.stats.requests >= self.max_requests:
            raise BudgetExhausted
        self.stats.requests += 1

    async def complete(
        self,
        messages: list[dict[str, str]],
        *,
        temperature: float = 0.0,
        max_tokens: int = 512,
        seed: int | None = None,
    ) -> Completion:
        """One completion, retried per the policy.

        Raises:
            BudgetExhausted: the request budget is spent.
            RetriesExhausted: every attempt failed with a retryable error.
            TeacherError: an error that retrying cannot fix, or a server that stopped answering.
        """
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": temperature,
            "max_tokens": max_tokens,
        }
        if seed is not None:
            body["seed"] = seed
        url = f"{self.base_url}/chat/completions"
        last_reason = ""
        for attempt in range(self.policy.max_retries + 1):
            if attempt:
                self.stats.retries += 1
            self._take_request()
            start = time.perf_counter()
            retry_after: float | None = None
            try:
                response = await self._http.post(url, json=body)
            except httpx.TimeoutException:
                last_reason = "timeout"
            except httpx.TransportError as err:  # refused, reset, dropped mid-body
                last_reason = f"connection ({type(err).__name__})"
                self._consecutive_connection_failures += 1
                if self._consecutive_connection_failures >= self.policy.max_consecutive_connection_failures:
                    raise TeacherError(
                        f"the teacher server at {self.base_url} did not answer "
                        f"{self._consecutive_connection_failures} times in a row ({type(err).__name__}); "
                        "is it running? Stored rationales are kept: re-run to continue."
                    ) from None
            else:
                self._consecutive_connection_failures = 0
                status = response.status_code
                if status == 200:
                    try:
                        return self._parse(response.json(), time.perf_counter() - start, attempt + 1)
                    except (ValueError, KeyError, IndexError, TypeError) as err:
                        last_reason = f"malformed response ({type(err).__name__})"
                elif status in (401, 403):
                    raise TeacherError(
                        f"the teacher server at {self.base_url} refused the API key (HTTP {status}); "
                        "check the variable named by --api-key-env"
                    )
                elif status in RETRY_STATUS:
                    last_reason = f"HTTP {status}"
                    header = response.headers.get("retry-after")
                    try:
                        retry_after = float(header) if header is not None else None
                    except ValueError:
                        retry_after = None
                else:
                    detail = response.text[:200].replace("\n", " ")
                    raise TeacherError(
                        f"the teacher server at {self.base_url} rejected the request "
                        f"(HTTP {status}): {detail}"
                    )
            self.stats.count(last_reason)
            if attempt < self.policy.max_retries:
                await asyncio.sleep(self.policy.delay(attempt, self._rng, retry_after))
        raise RetriesExhausted(last_reason)

    def _parse(self, payload: dict[str, Any], latency: float, attempts: int) -> Completion:
        choice = payload["choices"][0]
        text = choice["message"]["content"]
        if not isinstance(text, str):
            raise TypeError("message content is not a string")
        usage = payload.get("usage") or {}
        return Completion(
            text=text,
            finish_reason=choice.get("finish_reason"),
            usage={k: int(v) for k, v in usage.items() if isinstance(v, int)},
            model=str(payload.get("model", self.model)),
            latency_s=round(latency, 4),
            attempts=attempts,
        )
