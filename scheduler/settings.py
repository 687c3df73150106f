"""Compose every package's config section from scoreloop.toml, SCORELOOP_* env vars and CLI flags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from agent.config import AgentConfig
from market.config import MarketConfig
from rewards.config import RewardsConfig
from scheduler.config import SchedulerConfig
from store.config import StoreConfig
from store.errors import ScoreloopError
from trainer.config import TrainerConfig

DEFAULT_CONFIG_FILE = "scoreloop.toml"
DEFAULT_DATABASE_URL = "sqlite:///scoreloop.db"


class SettingsError(ScoreloopError, ValueError):
    """A config file or env var is wrong; the message names the key."""


class Settings(BaseSettings):
    """All of scoreloop's settings; precedence: CLI flags > SCORELOOP_* env > scoreloop.toml > defaults."""

    model_config = SettingsConfigDict(
        env_prefix="SCORELOOP_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    database_url: str = Field(DEFAULT_DATABASE_URL, description="SQLAlchemy URL of the store.")
    store: StoreConfig = Field(default_factory=StoreConfig)
    market: MarketConfig = Field(default_factory=MarketConfig)
    agent: AgentConfig = Field(default_factory=AgentConfig)
    rewards: RewardsConfig = Field(default_factory=RewardsConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)

    @model_validator(mode="after")
    def _rank_labels_need_groups(self) -> Settings:
        """`rank` labels compare the episodes run on the same item: without `each` exploration every item is
        run once, every episode would get the middle label, and the label would say nothing."""
        if self.rewards.label_format == "rank" and (self.agent.explore_tool_mode != "each"
                                                     or self.agent.explore_tool_rate <= 0):
            raise ValueError("rewards.label_format = 'rank' ranks each episode among the episodes of its item, so "
                             "train blocks must run items more than once: set agent.explore_tool_mode = 'each' "
                             "and agent.explore_tool_rate > 0")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = _CONFIG_FILE.get("path")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)


_CONFIG_FILE: dict[str, Path | None] = {"path": None}


def _format_error(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(root)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"{origin}: {key}: {msg}")
    return "; ".join(lines)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_settings(config_path: str | Path | None = None, **overrides: Any) -> Settings:
    """Load settings; `overrides` are CLI flags as nested dicts, e.g. agent={"block_size": 5}."""
    path = Path(config_path) if config_path else Path(os.environ.get("SCORELOOP_CONFIG", DEFAULT_CONFIG_FILE))
    if config_path is not None and not path.exists():
        raise SettingsError(f"config file not found: {path}")
    _CONFIG_FILE["path"] = path if path.exists() else None
    try:
        clean = {k: v for k, v in overrides.items() if v is not None and v != {}}
        return Settings(**clean)
    except ValidationError as err:
        raise SettingsError(_format_error(err, str(path) if path.exists() else "settings")) from None
    finally:
        _CONFIG_FILE["path"] = None
