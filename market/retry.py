"""One backoff policy for the live sources (tenacity): retry only the rate-limit error, exponentially."""

from __future__ import annotations

from collections.abc import Callable

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential


def backoff(retry_on: type[BaseException], *, retries: int, backoff_s: float,
            sleep: Callable[[float], None]) -> Retrying:
    """Call with `backoff(...)(fn, *args)`: waits backoff_s, 2·backoff_s, ... and re-raises the last error.

    Only `retry_on` is retried: a timeout or an unknown ticker will not get better by asking again,
    so those reach the caller at once and become typed errors there.
    """
    return Retrying(retry=retry_if_exception_type(retry_on), stop=stop_after_attempt(retries + 1),
                    wait=wait_exponential(multiplier=backoff_s), sleep=sleep, reraise=True)
