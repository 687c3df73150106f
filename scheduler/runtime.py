"""What a running daemon or loop holds for its whole life: settings, engine, one policy, one market,
one stop flag, and which adapter the policy serves now.

The steps (scheduler/steps.py) receive it; the APScheduler jobs find it by a string key.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import Engine

from scheduler.logs import log_event
from scheduler.settings import Settings
from store.db import session_scope
from store.lock import heartbeat

if TYPE_CHECKING:
    from market.sources import Market
    from policy.protocol import Policy


class Stopped(Exception):
    """The stop flag was set before a step could start."""


def version_label(version: int | None) -> str:
    return "base" if version is None else f"v{version}"


def scheduled_block_size(settings: Settings) -> int:
    """Items per daemon/loop block: [agent].block_size, the one block size setting."""
    return settings.agent.block_size


@dataclass
class Runtime:
    """One policy, one market, one stop flag for the life of a daemon or loop."""

    settings: Settings
    engine: Engine
    stop: threading.Event = field(default_factory=threading.Event)
    owner: str | None = None  # lock owner id; current_job is written to the lock row under it
    progress: bool = False
    market: Market | None = None
    policy: Policy | None = None
    base_model_dir: str | None = None
    blocks_run: int = 0
    current_job: str | None = None
    failed_blocks: set[int] = field(default_factory=set)
    job_lock: threading.Lock = field(default_factory=threading.Lock)

    def open(self) -> Runtime:
        """Build the market and the policy once (the policy starts on the serving adapter)."""
        from market.sources import build_market
        from policy.backends import build_policy
        from policy.model_files import resolve_model
        from trainer.registry import serving_adapter

        s = self.settings
        self.market = build_market(s.market, self.engine)
        with session_scope(self.engine) as sess:
            serving = serving_adapter(sess)
        if s.agent.backend == "local":
            self.base_model_dir = resolve_model(s.agent.model, s.agent.model_cache_dir)
        else:
            self.base_model_dir = s.agent.model
        t0 = time.monotonic()
        self.policy = build_policy(s.agent, serving)
        log_event("policy_ready", backend=s.agent.backend, model=s.agent.model,
                  adapter=version_label(self.policy.adapter_version), load_s=round(time.monotonic() - t0, 2))
        return self

    def close(self) -> None:
        if self.policy is not None:
            self.policy.close()
            self.policy = None

    @property
    def serving_version(self) -> int | None:
        """The adapter version the policy holds now (None = base model)."""
        return self.policy.adapter_version

    def set_job(self, name: str | None) -> None:
        """Show what we are doing in daemon_lock.current_job (also refreshes the heartbeat)."""
        if name == self.current_job:
            return
        self.current_job = name
        if self.owner is not None:
            try:
                heartbeat(self.engine, self.owner, current_job=name)
            except Exception as err:  # noqa: BLE001 - status display only; the heartbeat reports trouble
                log_event("current_job_not_saved", logging.WARNING, job=name, error=str(err))

    def serve(self, path: str | None, version: int | None) -> None:
        """Load this adapter into the policy unless it holds it already (between blocks only)."""
        if self.policy.adapter_version == version:
            return
        t0 = time.monotonic()
        self.policy.load_adapter(path, version)
        log_event("adapter_loaded", adapter=version_label(version), path=path,
                  load_s=round(time.monotonic() - t0, 2))

    def serve_published(self) -> int | None:
        """Load whatever the registry says serves now; returns that version."""
        from trainer.registry import serving_adapter

        with session_scope(self.engine) as s:
            serving = serving_adapter(s)
        path, version = serving if serving is not None else (None, None)
        self.serve(path, version)
        return version

    def serve_version(self, version: int | None) -> None:
        """Load a specific adapter version (the one an interrupted block started with)."""
        from store.training import adapter_row

        if version is None:
            self.serve(None, None)
            return
        with session_scope(self.engine) as s:
            row = adapter_row(s, version)
            path = row.path if row is not None else None
        if path is None:
            log_event("adapter_missing", logging.WARNING, adapter=version_label(version))
            return
        self.serve(path, version)
