import pytest

from scheduler.settings import SettingsError, load_settings


def test_defaults_run_offline():
    s = load_settings()
    assert s.database_url.startswith("sqlite:///")
    assert s.market.source == "synthetic"
    assert s.agent.backend == "local"


def test_toml_then_env_then_flags(tmp_path, monkeypatch):
    cfg = tmp_path / "scoreloop.toml"
    cfg.write_text('database_url = "sqlite:///a.db"\n[agent]\nblock_size = 5\ntarget_score = 0.9\n')
    s = load_settings(cfg)
    assert (s.database_url, s.agent.block_size, s.agent.target_score) == ("sqlite:///a.db", 5, 0.9)
    monkeypatch.setenv("SCORELOOP_AGENT__BLOCK_SIZE", "7")
    monkeypatch.setenv("SCORELOOP_DATABASE_URL", "sqlite:///b.db")
    s = load_settings(cfg)
    assert (s.database_url, s.agent.block_size, s.agent.target_score) == ("sqlite:///b.db", 7, 0.9)
    s = load_settings(cfg, agent={"block_size": 3})
    assert (s.agent.block_size, s.agent.target_score) == (3, 0.9)


def test_unknown_key_is_named(tmp_path):
    cfg = tmp_path / "scoreloop.toml"
    cfg.write_text("[agent]\nblok_size = 5\n")
    with pytest.raises(SettingsError, match=r"agent\.blok_size: unknown key"):
        load_settings(cfg)


def test_unknown_section_is_named(tmp_path):
    cfg = tmp_path / "scoreloop.toml"
    cfg.write_text("[agnet]\nblock_size = 5\n")
    with pytest.raises(SettingsError, match=r"agnet: unknown key"):
        load_settings(cfg)


def test_bad_value_is_named(monkeypatch):
    monkeypatch.setenv("SCORELOOP_AGENT__TARGET_SCORE", "1.7")
    with pytest.raises(SettingsError, match=r"agent\.target_score"):
        load_settings()


def test_missing_config_file(tmp_path):
    with pytest.raises(SettingsError, match="config file not found"):
        load_settings(tmp_path / "nope.toml")


def test_unknown_tool_exploration_mode_is_named_with_the_choices(tmp_path):
    """A typo in agent.explore_tool_mode stops at load time, naming the key and what it accepts,
    instead of silently falling back to one of the modes."""
    cfg = tmp_path / "scoreloop.toml"
    cfg.write_text('[agent]\nexplore_tool_rate = 0.3\nexplore_tool_mode = "every"\n')
    with pytest.raises(SettingsError, match=r"agent\.explore_tool_mode.*'draw' or 'each'"):
        load_settings(cfg)
    cfg.write_text('[agent]\nexplore_tool_rate = 0.3\nexplore_tool_mode = "each"\n')
    assert load_settings(cfg).agent.explore_tool_mode == "each"


def test_rank_labels_without_repeated_items_are_refused_with_the_fix(tmp_path):
    cfg = tmp_path / "scoreloop.toml"
    cfg.write_text('[rewards]\nlabel_format = "rank"\n')
    with pytest.raises(SettingsError, match=r"explore_tool_mode = 'each' and agent.explore_tool_rate > 0"):
        load_settings(cfg)
    cfg.write_text('[rewards]\nlabel_format = "rank"\nquantile_bins = 3\n'
                   '[agent]\nexplore_tool_mode = "each"\nexplore_tool_rate = 0.5\n')
    assert load_settings(cfg).rewards.label_format == "rank"


def test_leaving_wrong_decisions_out_needs_a_loss_that_locates_them(tmp_path):
    cfg = tmp_path / "scoreloop.toml"
    cfg.write_text('[trainer]\ndecision_from = "correct"\nloss_on = "assistant"\n')
    with pytest.raises(SettingsError, match=r"decision_from = 'correct' needs loss_on = 'weighted' or 'decision'"):
        load_settings(cfg)
    cfg.write_text('[trainer]\ndecision_from = "correct"\n')
    assert load_settings(cfg).trainer.decision_from == "correct"
