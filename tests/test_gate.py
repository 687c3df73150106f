"""The promotion gate's decision rule on constructed paired rewards, and what a decision leaves in the store."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import select

from store.db import session_scope
from store.models import Adapter, GateDecision, TrainingRun
from trainer.gate import GateInputError, apply_verdict, decide, detectable_effect, paired_statistic, sign_test

N = 100  # the default gate size


def rewards(seed: int, n: int = N) -> np.ndarray:
    """Per-item serving rewards with the spread a real block shows (about 0.2)."""
    return np.clip(np.random.default_rng(seed).normal(0.45, 0.2, n), 0, 1)


def test_a_clear_win_is_accepted():
    serving = rewards(1)
    candidate = np.clip(serving + 0.10 + np.random.default_rng(2).normal(0, 0.1, N), 0, 1)
    v = decide(serving, candidate, margin=0.02)
    assert v.decision == "accept" and v.passed
    assert v.statistic.ci_low > 0 and v.statistic.mean_diff > 0.05
    assert v.statistic.p_value < 0.01  # the sign test agrees


def test_pure_noise_keeps_the_serving_adapter():
    # Differences of +-0.2 with a zero mean: as large as a real block's spread, and no signal at all.
    serving = rewards(6)
    candidate = serving + np.where(np.arange(N) % 2 == 0, 0.2, -0.2)
    v = decide(serving, candidate, margin=0.02)
    assert v.decision == "keep" and not v.passed and v.statistic.ci_low < 0 < v.statistic.ci_high
    # Exchangeable draws (both adapters = the same item difficulty plus their own noise): at a two-sided
    # 90% level the rule should leave the serving adapter alone in about 90% of such gates.
    decisions = []
    for seed in range(40):
        item = rewards(100 + seed)
        noise = np.random.default_rng(200 + seed).normal(0, 0.15, (2, N))
        decisions.append(decide(np.clip(item + noise[0], 0, 1), np.clip(item + noise[1], 0, 1)).decision)
    assert decisions.count("keep") >= 32, decisions


def test_a_clear_loss_is_rejected():
    serving = rewards(3)
    candidate = np.clip(serving - 0.12 + np.random.default_rng(4).normal(0, 0.1, N), 0, 1)
    v = decide(serving, candidate, margin=0.02)
    assert v.decision == "reject" and not v.passed
    assert v.statistic.ci_high < 0


def test_a_real_but_tiny_win_below_the_margin_keeps_serving():
    serving = rewards(5)
    candidate = serving + 0.01  # every item slightly better: significant, but not worth a switch
    v = decide(serving, candidate, margin=0.02)
    assert v.decision == "keep" and "margin" in v.reason
    assert decide(serving, candidate, margin=0.0).decision == "accept"


def test_the_old_four_item_gate_could_not_decide():
    # Issue #15: v1 was rejected on 0.26 vs 0.43 over 4 items; with pairs that noisy the rule keeps serving.
    v = decide([0.43, 0.1, 0.7, 0.5], [0.26, 0.3, 0.2, 0.28], margin=0.02)
    assert v.decision == "keep" and v.statistic.n_pairs == 4


def test_statistic_figures_and_bad_input():
    st = paired_statistic([0.5, 0.5, 0.5, 0.2], [0.6, 0.5, 0.4, 0.4], seed=0)
    assert (st.wins, st.losses, st.ties, st.n_pairs) == (2, 1, 1, 4)
    assert st.mean_diff == pytest.approx(0.05)
    assert st.ci_low <= st.mean_diff <= st.ci_high
    assert paired_statistic([0.1] * 10, [0.3] * 10) == paired_statistic([0.1] * 10, [0.3] * 10)  # seeded
    assert sign_test(10, 0) == pytest.approx(2 / 2**10) and sign_test(3, 3) == 1.0 and sign_test(0, 0) is None
    with pytest.raises(GateInputError, match="equal lengths"):
        decide([0.1, 0.2], [0.1])
    with pytest.raises(GateInputError, match="finite"):
        decide([0.1, float("nan")], [0.1, 0.2])
    assert decide([], []).decision == "keep"


def test_detectable_effect_of_the_default_gate_size():
    assert detectable_effect(100) == pytest.approx(0.0497, abs=1e-3)
    assert detectable_effect(20) == pytest.approx(0.111, abs=1e-3)


def _candidate(engine, version, tmp_path):
    from trainer.registry import save_adapter

    class _Fake:  # writes a real PEFT-shaped folder (config + finite safetensors) the registry checks
        def save_pretrained(self, path):
            import json

            import torch
            from safetensors.torch import save_file

            (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
            save_file({"w": torch.zeros(2, 2)}, str(path / "adapter_model.safetensors"))

    folder = save_adapter(_Fake(), tmp_path / "adapters", version)
    with session_scope(engine) as s:
        run = TrainingRun(objective="sft", status="done")
        s.add(run)
        s.flush()
        s.add(Adapter(version=version, path=str(folder), base_model="tiny", status="candidate",
                      training_run_id=run.id))


@pytest.mark.parametrize("shift, decision, status", [(0.15, "accept", "serving"), (0.0, "keep", "rejected"),
                                                      (-0.15, "reject", "rejected")])
def test_the_decision_its_statistic_and_items_are_stored(fresh_db, tmp_path, shift, decision, status):
    _candidate(fresh_db, 1, tmp_path)
    serving = [0.2, 0.6] * 10
    candidate = [r + shift for r in serving]
    v = decide(serving, candidate, margin=0.02)
    assert v.decision == decision
    items = [["SYN01", f"2023-01-{d:02d}T21:01:00+00:00", s, c] for d, s, c in zip(range(1, 21), serving, candidate,
                                                                                    strict=True)]
    served = apply_verdict(fresh_db, 1, v, serving_version=None, serving_block_id=None, candidate_block_id=None,
                               items=items, region={"region": "gate", "first": "2023-01-01"})
    assert served is (decision == "accept")
    with session_scope(fresh_db) as s:
        row = s.scalar(select(GateDecision))
        assert (row.decision, row.n_pairs, row.rule) == (decision, 20, "paired_bootstrap_mean")
        assert row.mean_diff == pytest.approx(shift) and row.items == items and row.region["region"] == "gate"
        assert row.statistic["reason"] == v.reason
        adapter = s.scalar(select(Adapter).where(Adapter.version == 1))
        assert adapter.status == status and adapter.metrics["gate"]["decision"] == decision


def test_the_report_shows_each_gate_decision(fresh_db, tmp_path):
    from evaluation.report import render_html
    from store.report_data import report_data

    _candidate(fresh_db, 1, tmp_path)
    serving = [0.2, 0.6] * 10
    v = decide(serving, [r + 0.15 for r in serving], margin=0.02)
    apply_verdict(fresh_db, 1, v, serving_version=None, serving_block_id=None, candidate_block_id=None,
                  items=[["SYN01", "2023-01-03T21:01:00+00:00", 0.2, 0.35]],
                  region={"region": "gate", "first": "2022-10-18", "last": "2023-05-12"})
    with session_scope(fresh_db) as s:
        data = report_data(s)
    (g,) = data.gates
    assert (g.candidate_version, g.decision, g.n_pairs) == (1, "accept", 20)
    page = render_html(data, [])
    assert "Promotion gates" in page and "accept" in page and "2022-10-18..2023-05-12" in page
    assert f"[{g.ci_low:+.3f}, {g.ci_high:+.3f}]" in page


def test_status_shows_the_last_gate(fresh_db, tmp_path):
    from rich.console import Console

    from scheduler.status import collect_status, render_status

    _candidate(fresh_db, 1, tmp_path)
    serving = [0.2, 0.6] * 10
    apply_verdict(fresh_db, 1, decide(serving, serving), serving_version=None, serving_block_id=None,
                  candidate_block_id=None, items=[], region={"region": "gate", "first": "2022-10-18",
                                                             "last": "2023-05-12"})
    st = collect_status(fresh_db, ttl_s=30)
    assert st["last_gate"]["decision"] == "keep" and st["last_gate"]["n_pairs"] == 20
    console = Console(record=True, width=250)
    render_status(st, console)
    text = console.export_text()
    assert "v1 vs base: keep on 20 paired items, mean diff +0.000, 90% interval [+0.000, +0.000]" in text
    assert "sign-test p - (gate region 2022-10-18..2023-05-12)" in text


def test_small_gates_are_not_overconfident():
    # The plain percentile bootstrap at 8 pairs called about 20% of null gates accept or reject at level
    # 0.90; the expanded interval keeps that near the stated 10% (seeded, so the count is exact).
    calls = 0
    for seed in range(200):
        rng = np.random.default_rng(seed)
        item = np.clip(rng.normal(0.45, 0.2, 8), 0, 1)
        noise = rng.normal(0, 0.15, (2, 8))
        v = decide(np.clip(item + noise[0], 0, 1), np.clip(item + noise[1], 0, 1), margin=0.0, n_boot=2000,
                   seed=seed)
        calls += v.decision != "keep"
    assert calls / 200 <= 0.16
