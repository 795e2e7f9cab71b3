"""Hand-worked checks for forgetlab.metrics.cl.

Convention: R has shape (T+1, T); row 0 = initial model, row k = after task k,
column j = task j+1.
"""

import math

import numpy as np
import pytest

from forgetlab.metrics.cl import (
    acc,
    ap,
    as_score_matrix,
    avg_incremental_acc,
    bwt_gem,
    bwt_trace,
    cl_summary,
    drop_kept,
    forget,
    forgetting,
    fp,
    fwt,
    general_ability_delta,
    share_or_none,
    spurious_share,
)

# T = 3.           task1  task2  task3
R3 = np.array([
    [0.20, 0.10, 0.30],  # row 0: initial model
    [0.80, 0.95, 0.40],  # row 1: after task 1 (task 2 zero-shot is high!)
    [0.85, 0.90, 0.60],  # row 2: after task 2
    [0.50, 0.70, 0.90],  # row 3: after task 3 (final)
])
# Diagonal (just after learning): R[1,0]=0.80, R[2,1]=0.90, R[3,2]=0.90


def test_acc():
    # (0.5 + 0.7 + 0.9) / 3 = 2.1 / 3 = 0.7
    assert acc(R3) == pytest.approx(0.7)


def test_avg_incremental_acc():
    # k=1: 0.8 ; k=2: (0.85+0.90)/2 = 0.875 ; k=3: 0.7
    # (0.8 + 0.875 + 0.7) / 3 = 2.375 / 3
    assert avg_incremental_acc(R3) == pytest.approx(2.375 / 3)


def test_bwt_gem():
    # task1: 0.5-0.8 = -0.3 ; task2: 0.7-0.9 = -0.2 ; sum -0.5 ; / (T-1)=2 -> -0.25
    assert bwt_gem(R3) == pytest.approx(-0.25)


def test_bwt_trace():
    # same sum -0.5, divided by T=3
    assert bwt_trace(R3) == pytest.approx(-0.5 / 3)


def test_bwt_variants_differ_by_factor():
    rng = np.random.default_rng(0)
    for t in (2, 3, 5):
        R = rng.random((t + 1, t))
        assert bwt_trace(R) == pytest.approx(bwt_gem(R) * (t - 1) / t)
        assert bwt_trace(R) != pytest.approx(bwt_gem(R))


def test_fwt_initial_model_baseline():
    # task2: R[1,1]-R[0,1] = 0.95-0.10 = 0.85 ; task3: R[2,2]-R[0,2] = 0.60-0.30 = 0.30
    # (0.85 + 0.30) / 2 = 0.575
    assert fwt(R3) == pytest.approx(0.575)


def test_fwt_explicit_baseline():
    # b = [unused, 0.0, 0.5]: (0.95-0.0) + (0.60-0.5) = 1.05 ; / 2 = 0.525
    assert fwt(R3, b=[123.0, 0.0, 0.5]) == pytest.approx(0.525)


def test_fwt_bad_baseline():
    with pytest.raises(ValueError, match=r"b: expected .*\(3,\)"):
        fwt(R3, b=[0.0, 0.0])


def test_forgetting_chaudhry():
    # task1: max(R[1,0]=0.80, R[2,0]=0.85) - R[3,0]=0.50 = 0.35
    # task2: rows l>=2 only: R[2,1]=0.90 - 0.70 = 0.20  (R[1,1]=0.95 was before learning: ignored)
    # (0.35 + 0.20) / 2 = 0.275
    assert forgetting(R3) == pytest.approx(0.275)


def test_forgetting_not_clipped_when_task_improves_later():
    """A task that ends higher than right after learning it gives negative
    forgetting (the docstring says it is not clipped at 0), so the max must not
    include the final row."""
    R = [
        [0.10, 0.00, 0.20],
        [0.40, 0.10, 0.30],  # task1 learned: 0.40
        [0.50, 0.60, 0.30],  # task2 learned: 0.60
        [0.70, 0.90, 0.80],  # final: both earlier tasks improved further
    ]
    # task1: max(R[1,0]=0.40, R[2,0]=0.50) - R[3,0]=0.70 = -0.20
    # task2: R[2,1]=0.60 - R[3,1]=0.90 = -0.30
    # (-0.20 - 0.30) / 2 = -0.25
    assert forgetting(R) == pytest.approx(-0.25)


def test_ap_fp_forget():
    # AP = (0.80 + 0.90 + 0.90) / 3 = 2.6/3 ; FP = 0.7 ; forget = 2.6/3 - 0.7
    assert ap(R3) == pytest.approx(2.6 / 3)
    assert fp(R3) == pytest.approx(0.7)
    assert forget(R3) == pytest.approx(2.6 / 3 - 0.7)


def test_cl_summary_keys_and_values():
    s = cl_summary(R3.tolist())
    assert set(s) == {"acc", "avg_incremental_acc", "bwt_gem", "bwt_trace", "fwt",
                      "forgetting", "ap", "fp", "forget"}
    assert s["bwt_gem"] == pytest.approx(-0.25)
    assert s["forgetting"] == pytest.approx(0.275)
    assert all(isinstance(v, float) for v in s.values())


def test_single_task_gives_nan_for_cross_task_metrics():
    R1 = [[0.1], [0.6]]
    s = cl_summary(R1)
    for key in ("bwt_gem", "bwt_trace", "fwt", "forgetting"):
        assert math.isnan(s[key])
    # acc = avg_inc = ap = fp = 0.6 ; forget = 0
    for key in ("acc", "avg_incremental_acc", "ap", "fp"):
        assert s[key] == pytest.approx(0.6)
    assert s["forget"] == pytest.approx(0.0)


@pytest.mark.parametrize("bad", [
    [0.1, 0.2],                   # 1-D
    np.zeros((3, 3)),             # square, not (T+1, T)
    np.zeros((2, 3)),             # too few rows
    np.zeros((1, 0)),             # T = 0
    [[0.1], [float("nan")]],      # nan
    [[0.1], [float("inf")]],      # inf
    [["a"], ["b"]],               # not numeric
])
def test_validation_errors(bad):
    with pytest.raises(ValueError, match=r"^R: expected .*shape \(T\+1, T\)"):
        as_score_matrix(bad)
    with pytest.raises(ValueError):
        acc(bad)


def test_general_ability_delta():
    # (0.4-0.5) + (0.7-0.6) + (0.1-0.4) = -0.1 + 0.1 - 0.3 = -0.3 ; / 3 = -0.1
    assert general_ability_delta([0.5, 0.6, 0.4], [0.4, 0.7, 0.1]) == pytest.approx(-0.1)
    with pytest.raises(ValueError):
        general_ability_delta([0.5, 0.6], [0.4])
    with pytest.raises(ValueError):
        general_ability_delta([], [])


def test_spurious_share():
    assert spurious_share(0.8, 0.4, 0.8) == pytest.approx(1.0)   # full recovery
    assert spurious_share(0.8, 0.4, 0.4) == pytest.approx(0.0)   # none
    assert spurious_share(0.8, 0.4, 0.5) == pytest.approx(0.25)  # (0.5-0.4)/(0.8-0.4)
    assert spurious_share(0.8, 0.4, 0.9) == pytest.approx(1.25)  # not clipped above 1
    assert spurious_share(0.8, 0.4, 0.3) == pytest.approx(-0.25)  # not clipped below 0
    assert math.isnan(spurious_share(0.5, 0.5, 0.7))             # zero drop
    assert math.isnan(spurious_share(0.5, 0.5 + 1e-12, 0.7))     # ~zero drop
    assert math.isnan(spurious_share(0.50, 0.52, 0.40))           # a gain, not a drop: +6.0 would read "recovered"
    assert math.isnan(spurious_share(0.10, 0.11, 0.12))           # and -2.0 "got worse", both backwards
    # what run results hold: None (JSON null) instead of NaN, and None without a level before
    assert share_or_none(0.8, 0.4, 0.5) == pytest.approx(0.25)
    assert share_or_none(0.5, 0.52, 0.4) is None and share_or_none(None, 0.4, 0.5) is None


def test_drop_kept():
    assert drop_kept(20.0, 5.0) == pytest.approx(0.75)    # (20 - 5) / 20
    assert drop_kept(20.0, 20.0) == pytest.approx(0.0)    # the baseline's whole drop
    assert drop_kept(20.0, 0.0) == pytest.approx(1.0)     # nothing dropped
    assert drop_kept(20.0, 30.0) == pytest.approx(-0.5)   # a larger drop: not clipped
    assert drop_kept(20.0, -4.0) == pytest.approx(1.2)    # a gain
    assert math.isnan(drop_kept(0.0, 3.0)) and math.isnan(drop_kept(-2.0, 1.0))  # no baseline drop to keep
    assert math.isnan(drop_kept(2.1e-9, 21.9))  # float noise of averaged scores is no drop (was -1e10 "kept")
