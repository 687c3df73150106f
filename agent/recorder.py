"""Commits an episode's messages as steps the moment they exist (one short transaction each)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from agent.sanitize import storable_text
from store import traces
from store.db import session_factory, session_scope

T = TypeVar("T")


class WriteClock:
    """Time spent in trace writes (for the benches): summed over threads, and wall time with any write open.

    `busy_seconds` is the block's wall-clock share that really went to writing: concurrent writes
    (and a writer waiting on SQLite's lock while another commits) count once.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds = 0.0
        self.busy_seconds = 0.0
        self.writes = 0
        self._open = 0
        self._since = 0.0

    def enter(self) -> None:
        with self._lock:
            if self._open == 0:
                self._since = time.perf_counter()
            self._open += 1

    def leave(self, dt: float) -> None:
        with self._lock:
            self._open -= 1
            if self._open == 0:
                self.busy_seconds += time.perf_counter() - self._since
            self.seconds += dt
            self.writes += 1


class EpisodeRecorder:
    """Appends steps for one attempt of one episode, numbering them in order."""

    def __init__(self, db: Engine | sessionmaker[Session], episode_id: int, attempt: int,
                 clock: WriteClock | None = None) -> None:
        self.factory = db if isinstance(db, sessionmaker) else session_factory(db)
        self.episode_id = episode_id
        self.attempt = attempt
        self.next_idx = 0
        self.clock = clock

    @contextmanager
    def session(self) -> Iterator[Session]:
        if self.clock is not None:
            self.clock.enter()
        t0 = time.perf_counter()
        try:
            with session_scope(self.factory) as s:
                yield s
        finally:
            if self.clock is not None:
                self.clock.leave(time.perf_counter() - t0)

    def write(self, fn: Callable[[Session], T]) -> T:
        with self.session() as s:
            return fn(s)

    def step(self, role: str, content: str, **extra: Any) -> int:
        """Commit one message; returns the step id. NUL and lone surrogates (a model or a feed can send
        them; no database stores them) are kept as U+FFFD, the rest verbatim."""
        idx = self.next_idx
        content = storable_text(content)
        step_id = self.write(lambda s: traces.add_step(
            s, episode_id=self.episode_id, attempt=self.attempt, idx=idx, role=role, content=content, **extra))
        self.next_idx += 1
        return step_id
