"""`[scheduler]` settings: when the daemon runs blocks, resolves and trains."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class SchedulerConfig(BaseModel):
    """Daemon timing. Cron strings use APScheduler's crontab syntax."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["replay", "live"] = Field(
        "replay", description="replay: as_of walks through history, outcomes known at once; live: as_of = now."
    )
    block_interval_s: float = Field(
        60.0, gt=0, description="Replay mode: seconds between scheduled blocks."
    )
    block_cron: str = Field(
        "0 10 * * mon-fri", description="Live mode: crontab (America/New_York) for scheduled blocks."
    )
    resolve_cron: str = Field("30 16 * * mon-fri", description="Live mode: resolve after the close (New York).")
    resolve_interval_s: float = Field(30.0, gt=0, description="Replay mode: seconds between resolve passes.")
    trigger_poll_s: float = Field(2.0, gt=0, description="How often the daemon looks for manual triggers.")
    heartbeat_s: float = Field(5.0, gt=0, description="Daemon lock heartbeat period.")
    lock_ttl_s: float = Field(30.0, gt=0, description="A lock whose heartbeat is older than this is stale.")
    progress_log_s: float = Field(
        30.0, ge=0, description="Log a block_progress line this often while a block runs (0 = never)."
    )
    max_blocks: int = Field(0, ge=0, description="Stop after this many blocks (0 = run forever).")
