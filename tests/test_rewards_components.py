"""Reward components and the composite: hand-computed tables plus property tests."""

import math
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rewards.components import calibration_score, data_use_score, direction_score, magnitude_score
from rewards.composite import REWARD_VERSION, reward_version, score_prediction
from rewards.config import RewardsConfig, RewardWeights
from rewards.outcomes import (
    flat_band_pct,
    realized_direction,
    realized_return_pct,
    typical_move_pct,
)

AS_OF = datetime(2024, 3, 8, 21, 1, tzinfo=UTC)
RETRIEVED = {1: AS_OF - timedelta(days=1), 2: AS_OF - timedelta(hours=1), 3: AS_OF + timedelta(hours=1),
             4: AS_OF}
CFG = RewardsConfig()


@pytest.mark.parametrize("pred,real,expected", [
    ("up", "up", 1.0), ("up", "down", 0.0), ("flat", "flat", 1.0), ("down", "flat", 0.0), ("flat", "up", 0.0),
])
def test_direction_table(pred, real, expected):
    assert direction_score(pred, real) == expected


@pytest.mark.parametrize("mag,ret,typical,expected", [
    (2.0, 2.0, 1.0, 1.0),             # exact
    (3.0, 2.0, 1.0, 0.5),             # one typical move off -> half
    (0.0, -2.0, 1.0, 0.25),           # two typical moves off (sign is direction's business)
    (2.0, -2.0, 1.0, 1.0),            # magnitude compares with |realized|
    (1.0, 4.0, 2.0, 2 ** -1.5),       # 1.5 typical moves off
    (5.0, 5.0, 0.0, 1.0),             # zero typical move is floored, exact still 1
])
def test_magnitude_table(mag, ret, typical, expected):
    assert magnitude_score(mag, ret, typical) == pytest.approx(expected)


@pytest.mark.parametrize("conf,correct,expected", [
    (1.0, True, 1.0), (1.0, False, 0.0), (0.5, True, 0.75), (0.5, False, 0.75),
    (0.8, True, 0.96), (0.8, False, 0.36), (0.0, False, 1.0),
])
def test_calibration_table(conf, correct, expected):
    assert calibration_score(conf, correct) == pytest.approx(expected)


@pytest.mark.parametrize("cites,expected", [
    ([1, 2], 1.0),        # both retrieved, both before as_of
    ([1, 99], 0.5),       # 99 was never retrieved: fabricated
    ([3], 0.0),           # retrieved but published after as_of
    ([4], 0.0),           # published exactly at as_of is not "before"
    ([], 0.0),            # no citations earn nothing
    ([1, 1], 1.0),        # duplicates count once
    (["abc", 1], 0.5),    # a string that is not an id resolves to nothing
])
def test_data_use_table(cites, expected):
    assert data_use_score(cites, RETRIEVED, AS_OF) == pytest.approx(expected)


@pytest.mark.parametrize("ret,band,expected", [
    (0.3, 0.5, "flat"), (-0.3, 0.5, "flat"), (0.5, 0.5, "up"), (-0.7, 0.5, "down"), (0.0, 0.0, "flat"),
    (0.01, 0.0, "up"),
])
def test_realized_direction_table(ret, band, expected):
    assert realized_direction(ret, band) == expected


def test_outcome_arithmetic():
    assert realized_return_pct(100.0, 103.0) == pytest.approx(3.0)
    assert realized_return_pct(200.0, 190.0) == pytest.approx(-5.0)
    for bad in [(0.0, 1.0), (1.0, -1.0), (math.nan, 1.0)]:
        with pytest.raises(ValueError):
            realized_return_pct(*bad)
    closes = [100.0, 101.0, 99.0, 102.0]
    assert typical_move_pct(closes, 1) == pytest.approx((1.0 + 100 * 2 / 101 + 100 * 3 / 99) / 3)
    assert typical_move_pct(closes, 2) == pytest.approx((1.0 + 100 * 1 / 101) / 2)
    assert typical_move_pct(closes, 5) is None
    assert typical_move_pct([50.0] * 10, 2) == 0.01  # constant price: floored, never 0
    assert flat_band_pct(CFG, 4.0) == 0.5
    assert flat_band_pct(RewardsConfig(flat_band_mode="vol", flat_band_pct=0.5), 4.0) == 2.0


def _score(**kw):
    base = {"direction": "up", "magnitude_pct": 3.0, "confidence": 0.8, "citations": [1, 99], "realized_return_pct": 2.0,
                "typical_move_pct": 2.0, "retrieved": RETRIEVED, "as_of": AS_OF, "cfg": CFG}
    return score_prediction(**{**base, **kw})


def test_composite_hand_computed():
    r = _score()
    # direction 1, magnitude 2^-0.5, calibration 1-0.2^2, data use 1/2; weights .4/.2/.3/.1
    assert (r.direction, r.calibration, r.data_use) == (1.0, pytest.approx(0.96), 0.5)
    assert r.magnitude == pytest.approx(2 ** -0.5)
    assert r.composite == pytest.approx(0.4 + 0.2 * 2 ** -0.5 + 0.3 * 0.96 + 0.1 * 0.5)
    assert r.valid and r.reason is None and r.realized_direction == "up" and r.correct

    wrong = _score(direction="down", magnitude_pct=1.0, confidence=0.9, citations=[])
    assert wrong.composite == pytest.approx(0.2 * 2 ** -0.5 + 0.3 * (1 - 0.81))
    assert wrong.correct is False


def test_vol_band_and_weights_in_version():
    cfg = RewardsConfig(flat_band_mode="vol", flat_band_pct=0.5,
                        weights=RewardWeights(direction=2, magnitude=1, calibration=1, data_use=0))
    # band = 0.5 * typical 4% = 2%, so +1.5% is flat
    r = _score(direction="flat", magnitude_pct=1.5, confidence=0.7, citations=[], realized_return_pct=1.5,
               typical_move_pct=4.0, cfg=cfg)
    assert r.realized_direction == "flat"
    assert r.composite == pytest.approx(0.5 * 1 + 0.25 * 1 + 0.25 * (1 - 0.09))
    assert r.reward_version == "r1|w=0.5,0.25,0.25,0|band=0.5vol"
    assert REWARD_VERSION == "r1|w=0.4,0.2,0.3,0.1|band=0.5pct" == reward_version(RewardsConfig())
    # same normalised weights, same version; a different band, a different version
    assert reward_version(RewardsConfig(weights=RewardWeights(direction=4, magnitude=2, calibration=3,
                                                              data_use=1))) == REWARD_VERSION
    assert reward_version(RewardsConfig(flat_band_pct=1.0)) != REWARD_VERSION
    assert len(reward_version(RewardsConfig(weights=RewardWeights(direction=1 / 3, magnitude=1 / 7,
              calibration=1 / 9, data_use=1 / 11), flat_band_pct=12.345, flat_band_mode="vol"))) <= 64


def test_parse_failure_scores_zero_with_reason():
    r = _score(valid=False, parse_error="no JSON object in output")
    assert (r.composite, r.direction, r.magnitude, r.calibration, r.data_use) == (0, 0, 0, 0, 0)
    assert r.reason == "parse failure: no JSON object in output" and not r.valid


@pytest.mark.parametrize("field,value,needle", [
    ("confidence", math.nan, "confidence must be finite"),
    ("confidence", math.inf, "confidence must be finite"),
    ("confidence", -0.1, "confidence must be in [0, 1]"),
    ("confidence", 1.5, "confidence must be in [0, 1]"),
    ("confidence", "0.9", "confidence must be a number"),
    ("confidence", None, "confidence must be a number"),
    ("magnitude_pct", 1e9, "magnitude_pct must be in [0, 1000]"),
    ("magnitude_pct", -1.0, "magnitude_pct must be in [0, 1000]"),
    ("magnitude_pct", -math.inf, "magnitude_pct must be finite"),
    ("citations", [1.5], "citation 1.5 is not a snippet id"),
    ("citations", [None], "citation None is not a snippet id"),
    ("citations", [{"id": 1}], "is not a snippet id"),
    ("citations", [True], "citation True is not a snippet id"),
    ("citations", "1,2", "citations must be a list"),
    ("citations", 7, "citations must be a list"),
    ("direction", "sideways", "direction must be one of"),
    ("direction", None, "direction must be one of"),
])
def test_bad_values_score_zero_with_reason(field, value, needle):
    r = _score(**{field: value})
    assert r.composite == 0.0 and not r.valid
    assert r.reason.startswith("validation: ") and needle in r.reason


def test_string_ids_are_accepted_as_citations():
    assert _score(citations=["1", "2"]).data_use == 1.0


# ---- properties -------------------------------------------------------------------------------

anything = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(), st.text(max_size=3),
                     st.none())
returns = st.floats(-95, 500, allow_nan=False)
typicals = st.floats(0, 50, allow_nan=False)
cfgs = st.builds(
    RewardsConfig,
    weights=st.builds(RewardWeights, direction=st.floats(0.01, 5), magnitude=st.floats(0, 5),
                      calibration=st.floats(0, 5), data_use=st.floats(0, 5)),
    flat_band_pct=st.floats(0, 3), flat_band_mode=st.sampled_from(["pct", "vol"]),
)


@settings(max_examples=300, deadline=None)
@given(direction=st.one_of(st.sampled_from(["up", "down", "flat"]), st.text(max_size=5)),
       magnitude=st.one_of(st.floats(0, 2000), anything), confidence=st.one_of(st.floats(0, 1), anything),
       citations=st.one_of(st.lists(st.one_of(st.integers(0, 6), st.text(max_size=2)), max_size=5), anything),
       ret=returns, typical=typicals, cfg=cfgs)
def test_every_component_in_unit_interval(direction, magnitude, confidence, citations, ret, typical, cfg):
    r = score_prediction(direction=direction, magnitude_pct=magnitude, confidence=confidence,
                         citations=citations, realized_return_pct=ret, typical_move_pct=typical,
                         retrieved=RETRIEVED, as_of=AS_OF, cfg=cfg)
    for v in (r.direction, r.magnitude, r.calibration, r.data_use, r.composite):
        assert 0.0 <= v <= 1.0
    assert r.valid or (r.composite == 0.0 and r.reason)


@settings(max_examples=200, deadline=None)
@given(ret=returns, typical=typicals, cfg=cfgs)
def test_perfect_prediction_scores_at_least_095(ret, typical, cfg):
    realized = realized_direction(ret, flat_band_pct(cfg, typical))
    r = score_prediction(direction=realized, magnitude_pct=abs(ret), confidence=1.0, citations=[1, 2],
                         realized_return_pct=ret, typical_move_pct=typical, retrieved=RETRIEVED, as_of=AS_OF,
                         cfg=cfg)
    assert r.composite >= 0.95


@settings(max_examples=200, deadline=None)
@given(lo=st.floats(0, 1), hi=st.floats(0, 1))
def test_confident_wrong_call_is_less_calibrated(lo, hi):
    lo, hi = sorted((lo, hi))
    if hi - lo < 1e-9:
        return
    assert calibration_score(hi, False) < calibration_score(lo, False)


@settings(max_examples=200, deadline=None)
@given(ret=returns, typical=typicals, e1=st.floats(0, 400), e2=st.floats(0, 400),
       direction=st.sampled_from(["up", "down", "flat"]), conf=st.floats(0, 1), cfg=cfgs)
def test_reward_monotone_in_magnitude_error(ret, typical, e1, e2, direction, conf, cfg):
    small, large = sorted((e1, e2))

    def composite(err):
        return score_prediction(direction=direction, magnitude_pct=abs(ret) + err, confidence=conf, citations=[1],
                                realized_return_pct=ret, typical_move_pct=typical, retrieved=RETRIEVED,
                                as_of=AS_OF, cfg=cfg)

    a, b = composite(small), composite(large)
    assert a.magnitude >= b.magnitude
    assert a.composite >= b.composite - 1e-12
