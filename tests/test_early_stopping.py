"""Both early-stopping rules on scripted validation-loss sequences."""

import pytest

from bitmoji.trainer.early_stopping import EarlyStopping


def run(stopper, losses):
    for epoch, loss in enumerate(losses, start=1):
        if stopper.step(epoch, loss):
            return epoch
    return None


def test_lecture_rule_needs_consecutive_rises():
    # rises at epochs 3 and 4, a fall at 5 resets the count, then rises at 6, 7, 8
    losses = [1.0, 0.9, 0.95, 0.97, 0.96, 0.98, 0.99, 1.0, 0.5]
    stopper = EarlyStopping("lecture", patience=3)
    assert run(stopper, losses) == 8
    assert stopper.best_epoch == 2 and stopper.best_loss == 0.9
    assert "rose 3 epochs in a row" in stopper.reason


def test_lecture_rule_ignores_stagnation_without_rise():
    stopper = EarlyStopping("lecture", patience=2)
    assert run(stopper, [1.0, 1.0, 1.0, 1.0, 1.0]) is None


def test_best_rule_counts_epochs_without_improvement():
    # 0.89 improves on 0.9 by less than min_delta 0.05: not an improvement
    losses = [1.0, 0.9, 0.89, 0.95, 0.88, 0.7]
    stopper = EarlyStopping("best", patience=3, min_delta=0.05)
    assert run(stopper, losses) == 5
    assert stopper.best_epoch == 5  # the best loss is still tracked exactly
    assert stopper.stopped_epoch == 5


def test_best_rule_resets_on_improvement():
    stopper = EarlyStopping("best", patience=2)
    assert run(stopper, [1.0, 1.1, 0.9, 1.0, 0.8, 0.85, 0.86]) == 7
    assert stopper.best_epoch == 5


def test_state_round_trip_continues_identically():
    losses = [1.0, 0.9, 0.95, 0.97, 0.99, 1.0]
    a = EarlyStopping("lecture", patience=3)
    run(a, losses[:3])
    b = EarlyStopping("lecture", patience=3)
    b.load_state_dict(a.state_dict())
    for epoch, loss in enumerate(losses[3:], start=4):
        assert a.step(epoch, loss) == b.step(epoch, loss)
    assert a.state_dict() == b.state_dict()


def test_bad_configuration():
    with pytest.raises(ValueError, match="unknown early-stopping rule"):
        EarlyStopping("sometimes")
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping("best", patience=0)
