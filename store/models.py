"""SQLAlchemy 2.0 typed models: the full trace of every block, episode, step and score.

Unique constraints make every write idempotent on retry (one prediction per episode,
one outcome per prediction, one reward per prediction and reward version, one step
per (episode, attempt, index)), which is what lets a crashed block resume without
duplicates.
"""

from __future__ import annotations

from datetime import UTC, date, datetime

from sqlalchemy import (
    JSON,
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on both SQLite (which drops tzinfo) and PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use timezone-aware UTC")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict: JSON, list: JSON}  # noqa: RUF012 - SQLAlchemy reads this class attribute


class Block(Base):
    """A block of N (ticker, as_of) items run by one adapter version."""

    __tablename__ = "blocks"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), default="train")  # train | eval | gate
    mode: Mapped[str] = mapped_column(String(16), default="replay")  # replay | live
    market: Mapped[str] = mapped_column(String(32))
    size: Mapped[int] = mapped_column(Integer)
    as_of: Mapped[datetime | None] = mapped_column(nullable=True)
    horizon: Mapped[int] = mapped_column(Integer, default=5)
    status: Mapped[str] = mapped_column(String(16), default="running")  # running | complete | failed
    adapter_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    target_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    conditioning: Mapped[str | None] = mapped_column(Text, nullable=True)
    seed: Mapped[int] = mapped_column(Integer, default=0)
    trigger_id: Mapped[int | None] = mapped_column(ForeignKey("triggers.id"), nullable=True)
    eval_run_id: Mapped[int | None] = mapped_column(ForeignKey("eval_runs.id"), nullable=True)
    config: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)

    episodes: Mapped[list[Episode]] = relationship(back_populates="block")


class Episode(Base):
    """One forecast of one ticker at one as_of; planned when the block is created."""

    __tablename__ = "episodes"
    __table_args__ = (
        UniqueConstraint("block_id", "idx", name="uq_episode_block_idx"),
        Index("ix_episodes_status", "block_id", "status"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    block_id: Mapped[int] = mapped_column(ForeignKey("blocks.id", ondelete="CASCADE"))
    idx: Mapped[int] = mapped_column(Integer)
    ticker: Mapped[str] = mapped_column(String(32))
    as_of: Mapped[datetime] = mapped_column()
    horizon: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending | running | done | failed
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    adapter_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    target_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    conditioning: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Direction exploration (agent.explore_rate): the direction the prediction was constrained to.
    explore_direction: Mapped[str | None] = mapped_column(String(8), nullable=True)
    # Tool exploration (0004): the one tool this episode's research plan was, or "none"; NULL = the configured plan.
    explore_tool: Mapped[str | None] = mapped_column(String(32), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)

    block: Mapped[Block] = relationship(back_populates="episodes")


class Step(Base):
    """One message of an episode (system, user, assistant, tool), committed as it happens."""

    __tablename__ = "steps"
    __table_args__ = (UniqueConstraint("episode_id", "attempt", "idx", name="uq_step_episode_attempt_idx"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    episode_id: Mapped[int] = mapped_column(ForeignKey("episodes.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    idx: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    tool_name: Mapped[str | None] = mapped_column(String(64), nullable=True)
    tool_args: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    completion_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    latency_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ToolCall(Base):
    """A tool invocation: arguments, result or error, latency, cache use, point-in-time drops."""

    __tablename__ = "tool_calls"
    __table_args__ = (Index("ix_tool_calls_episode", "episode_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    episode_id: Mapped[int] = mapped_column(ForeignKey("episodes.id", ondelete="CASCADE"))
    step_id: Mapped[int | None] = mapped_column(ForeignKey("steps.id", ondelete="CASCADE"), nullable=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    name: Mapped[str] = mapped_column(String(64))
    args: Mapped[dict] = mapped_column(JSON, default=dict)
    as_of: Mapped[datetime] = mapped_column()
    result: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    latency_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    cache_hit: Mapped[bool] = mapped_column(Boolean, default=False)
    dropped_future: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Snippet(Base):
    """A retrieved document, deduplicated by content hash; citations point here."""

    __tablename__ = "snippets"
    __table_args__ = (Index("ix_snippets_ticker_published", "ticker", "published_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    content_hash: Mapped[str] = mapped_column(String(64), unique=True)
    source: Mapped[str] = mapped_column(String(64))
    url: Mapped[str | None] = mapped_column(Text, nullable=True)
    title: Mapped[str] = mapped_column(Text)
    text: Mapped[str] = mapped_column(Text)
    ticker: Mapped[str | None] = mapped_column(String(32), nullable=True)
    published_at: Mapped[datetime] = mapped_column()
    fetched_at: Mapped[datetime] = mapped_column(default=utcnow)


class ToolCallSnippet(Base):
    """Which snippets a tool call returned, in rank order."""

    __tablename__ = "tool_call_snippets"

    tool_call_id: Mapped[int] = mapped_column(ForeignKey("tool_calls.id", ondelete="CASCADE"), primary_key=True)
    snippet_id: Mapped[int] = mapped_column(ForeignKey("snippets.id", ondelete="CASCADE"), primary_key=True)
    rank: Mapped[int] = mapped_column(Integer, default=0)


class PriceBar(Base):
    """Cached daily bar from a price source, so live blocks replay exactly and repeat calls stay local."""

    __tablename__ = "price_bars"
    __table_args__ = (UniqueConstraint("source", "ticker", "date", name="uq_bar_source_ticker_date"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    source: Mapped[str] = mapped_column(String(32))
    ticker: Mapped[str] = mapped_column(String(32))
    date: Mapped[date] = mapped_column(Date)
    open: Mapped[float] = mapped_column(Float)
    high: Mapped[float] = mapped_column(Float)
    low: Mapped[float] = mapped_column(Float)
    close: Mapped[float] = mapped_column(Float)
    adj_close: Mapped[float] = mapped_column(Float)
    volume: Mapped[float] = mapped_column(Float)
    fetched_at: Mapped[datetime] = mapped_column(default=utcnow)


class NewsQuery(Base):
    """A news search a network source answered, with the snippets it returned in order (the news cache)."""

    __tablename__ = "news_queries"
    __table_args__ = (UniqueConstraint("source", "query_key", name="uq_news_query_source_key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    source: Mapped[str] = mapped_column(String(32))
    query_key: Mapped[str] = mapped_column(String(64))  # sha256 of query, ticker, max_results, as_of
    query: Mapped[str] = mapped_column(Text)
    ticker: Mapped[str | None] = mapped_column(String(32), nullable=True)
    as_of: Mapped[datetime] = mapped_column()
    snippet_ids: Mapped[list] = mapped_column(JSON, default=list)
    dropped_future: Mapped[int] = mapped_column(Integer, default=0)
    fetched_at: Mapped[datetime] = mapped_column(default=utcnow)


class Prediction(Base):
    """The final answer of an episode, valid or a recorded parse failure."""

    __tablename__ = "predictions"
    __table_args__ = (
        Index("ix_predictions_block", "block_id"),
        Index("ix_predictions_ticker", "ticker"),
        Index("ix_predictions_resolve_at", "resolve_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    episode_id: Mapped[int] = mapped_column(ForeignKey("episodes.id", ondelete="CASCADE"), unique=True)
    block_id: Mapped[int] = mapped_column(ForeignKey("blocks.id", ondelete="CASCADE"))
    ticker: Mapped[str] = mapped_column(String(32))
    as_of: Mapped[datetime] = mapped_column()
    horizon: Mapped[int] = mapped_column(Integer)
    resolve_at: Mapped[date] = mapped_column(Date)
    direction: Mapped[str | None] = mapped_column(String(8), nullable=True)
    magnitude_pct: Mapped[float | None] = mapped_column(Float, nullable=True)
    confidence: Mapped[float | None] = mapped_column(Float, nullable=True)  # published (after the map)
    stated_confidence: Mapped[float | None] = mapped_column(Float, nullable=True)  # what the model wrote
    rationale: Mapped[str | None] = mapped_column(Text, nullable=True)
    citations: Mapped[list | None] = mapped_column(JSON, nullable=True)
    valid: Mapped[bool] = mapped_column(Boolean, default=True)
    parse_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    raw_output: Mapped[str | None] = mapped_column(Text, nullable=True)
    adapter_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    target_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    conditioning: Mapped[str | None] = mapped_column(Text, nullable=True)
    pending_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Outcome(Base):
    """What actually happened: close at as_of and close `horizon` trading days later."""

    __tablename__ = "outcomes"
    # ticker and correct are copied from the prediction so per-ticker accuracy over millions of
    # rows is an index-only scan instead of a join (bench/store_bench.py).
    __table_args__ = (Index("ix_outcomes_ticker_correct", "ticker", "correct"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    prediction_id: Mapped[int] = mapped_column(ForeignKey("predictions.id", ondelete="CASCADE"), unique=True)
    ticker: Mapped[str | None] = mapped_column(String(32), nullable=True)
    correct: Mapped[int | None] = mapped_column(Integer, nullable=True)  # 1/0; NULL for an invalid prediction
    close_as_of: Mapped[float] = mapped_column(Float)
    close_resolve: Mapped[float] = mapped_column(Float)
    as_of_date: Mapped[date] = mapped_column(Date)
    resolve_date: Mapped[date] = mapped_column(Date)
    realized_return_pct: Mapped[float] = mapped_column(Float)
    realized_direction: Mapped[str] = mapped_column(String(8))
    typical_move_pct: Mapped[float | None] = mapped_column(Float, nullable=True)
    resolved_at: Mapped[datetime] = mapped_column(default=utcnow)


class Reward(Base):
    """Reward components in [0, 1], the composite and the version that produced them."""

    __tablename__ = "rewards"
    __table_args__ = (UniqueConstraint("prediction_id", "reward_version", name="uq_reward_prediction_version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    prediction_id: Mapped[int] = mapped_column(ForeignKey("predictions.id", ondelete="CASCADE"))
    reward_version: Mapped[str] = mapped_column(String(64))
    direction: Mapped[float] = mapped_column(Float)
    magnitude: Mapped[float] = mapped_column(Float)
    calibration: Mapped[float] = mapped_column(Float)
    data_use: Mapped[float] = mapped_column(Float)
    composite: Mapped[float] = mapped_column(Float)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class BlockMetric(Base):
    """Per-block metrics for the model and each baseline on the same items (one row per name)."""

    __tablename__ = "block_metrics"
    __table_args__ = (UniqueConstraint("block_id", "name", name="uq_block_metric_name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    block_id: Mapped[int] = mapped_column(ForeignKey("blocks.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(32))  # model | always_up | momentum_20d | coin_flip
    reward_version: Mapped[str] = mapped_column(String(64))
    n: Mapped[int] = mapped_column(Integer)
    n_valid: Mapped[int] = mapped_column(Integer)
    accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    mean_composite: Mapped[float | None] = mapped_column(Float, nullable=True)
    brier: Mapped[float | None] = mapped_column(Float, nullable=True)
    ece: Mapped[float | None] = mapped_column(Float, nullable=True)
    mean_abs_magnitude_error: Mapped[float | None] = mapped_column(Float, nullable=True)
    coverage: Mapped[float | None] = mapped_column(Float, nullable=True)
    skill: Mapped[float | None] = mapped_column(Float, nullable=True)
    computed_at: Mapped[datetime] = mapped_column(default=utcnow)


class TrainingRun(Base):
    """One training round: data, hyperparameters, loss curve, checkpoint folder, outcome."""

    __tablename__ = "training_runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    objective: Mapped[str] = mapped_column(String(16), default="sft")
    status: Mapped[str] = mapped_column(String(16), default="running")  # running | done | failed
    parent_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    adapter_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    block_ids: Mapped[list] = mapped_column(JSON, default=list)
    replay_episode_ids: Mapped[list] = mapped_column(JSON, default=list)
    n_examples: Mapped[int] = mapped_column(Integer, default=0)
    hyperparams: Mapped[dict] = mapped_column(JSON, default=dict)
    loss_curve: Mapped[list] = mapped_column(JSON, default=list)
    checkpoint_dir: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)


class Adapter(Base):
    """A LoRA adapter version; exactly one row has status `serving` at a time."""

    __tablename__ = "adapters"

    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[int] = mapped_column(Integer, unique=True)
    parent_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    path: Mapped[str] = mapped_column(Text)
    base_model: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="candidate")  # candidate|serving|retired|rejected
    training_run_id: Mapped[int | None] = mapped_column(ForeignKey("training_runs.id"), nullable=True)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(nullable=True)


class Trigger(Base):
    """A manual request (e.g. `scoreloop block trigger`) that the daemon runs exactly once."""

    __tablename__ = "triggers"
    __table_args__ = (Index("ix_triggers_status", "status"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), default="block")
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default="queued")  # queued | running | done | failed
    result: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)


class DaemonLock(Base):
    """The single-daemon lock: one row per database, kept alive by a heartbeat."""

    __tablename__ = "daemon_lock"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128))
    pid: Mapped[int] = mapped_column(Integer)
    host: Mapped[str] = mapped_column(String(128))
    current_job: Mapped[str | None] = mapped_column(Text, nullable=True)
    acquired_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Fencing token: the lock_epochs counter at this holder's acquisition. Every write a fenced
    # process makes checks it in the same transaction, so a holder that was taken over is refused.
    epoch: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class LockEpoch(Base):
    """The lock's acquisition counter. A row of its own because daemon_lock's row is deleted on
    release, and the epoch must never repeat: a paused holder must not find its old number again."""

    __tablename__ = "lock_epochs"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    epoch: Mapped[int] = mapped_column(Integer, default=0)


class EvalRun(Base):
    """A controllability evaluation: held-out items conditioned on several target scores."""

    __tablename__ = "eval_runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    adapter_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    targets: Mapped[list] = mapped_column(JSON, default=list)
    market: Mapped[str] = mapped_column(String(32))
    n_items: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="running")
    results: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)


class GateDecision(Base):
    """One promotion gate: candidate vs serving on the same gate-region items, the paired statistic and the call."""

    __tablename__ = "gate_decisions"
    __table_args__ = (Index("ix_gate_decisions_candidate", "candidate_version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    candidate_version: Mapped[int] = mapped_column(Integer)
    serving_version: Mapped[int | None] = mapped_column(Integer, nullable=True)  # None = the base model served
    candidate_block_id: Mapped[int | None] = mapped_column(ForeignKey("blocks.id", ondelete="SET NULL"),
                                                           nullable=True)
    serving_block_id: Mapped[int | None] = mapped_column(ForeignKey("blocks.id", ondelete="SET NULL"),
                                                         nullable=True)
    decision: Mapped[str] = mapped_column(String(16))  # accept | keep (no evidence either way) | reject
    passed: Mapped[bool] = mapped_column(Boolean)  # True = the candidate was published
    rule: Mapped[str] = mapped_column(String(64))  # e.g. paired_bootstrap_mean
    level: Mapped[float] = mapped_column(Float)  # two-sided confidence level of the interval
    margin: Mapped[float] = mapped_column(Float)  # improvement in mean reward the candidate must also show
    n_pairs: Mapped[int] = mapped_column(Integer)
    mean_diff: Mapped[float | None] = mapped_column(Float, nullable=True)  # mean(candidate - serving)
    ci_low: Mapped[float | None] = mapped_column(Float, nullable=True)
    ci_high: Mapped[float | None] = mapped_column(Float, nullable=True)
    p_value: Mapped[float | None] = mapped_column(Float, nullable=True)  # sign test, two-sided
    statistic: Mapped[dict] = mapped_column(JSON, default=dict)  # every figure of the rule, for the report
    items: Mapped[list] = mapped_column(JSON, default=list)  # [[ticker, as_of iso, serving r, candidate r], ...]
    region: Mapped[dict] = mapped_column(JSON, default=dict)  # the gate region the items were drawn from
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
