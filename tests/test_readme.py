"""The README's configuration example is real configuration: it must load."""

from pathlib import Path

from scheduler.settings import load_settings

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_toml_example_loads(tmp_path):
    text = README.read_text()
    start = text.index("```toml\n") + len("```toml\n")
    example = text[start:text.index("```", start)]
    cfg = tmp_path / "scoreloop.toml"
    cfg.write_text(example)
    s = load_settings(cfg)
    assert s.market.source == "synthetic"
    assert s.rewards.label_format == "score"
    assert s.agent.target_score == 0.95
