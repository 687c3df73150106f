"""`[store]` settings: where the SQL store lives and how it is opened."""

from pydantic import BaseModel, ConfigDict, Field


class StoreConfig(BaseModel):
    """Database options; the URL itself is the top-level `database_url` setting."""

    model_config = ConfigDict(extra="forbid")

    echo: bool = Field(False, description="Log every SQL statement (debugging).")
    sqlite_busy_timeout_ms: int = Field(
        30_000, ge=0, description="How long a SQLite writer waits for a lock before failing."
    )
    pool_size: int = Field(5, ge=1, description="Connection pool size for PostgreSQL.")
    connect_timeout_s: int = Field(5, ge=1, description="Seconds before an unreachable server is reported.")
