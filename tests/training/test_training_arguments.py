"""kspike.training.arguments: argument checks (short messages), options and the fit plan."""
from types import SimpleNamespace

import numpy as np
import pytest

from kspike.training import arguments


def test_describe_never_prints_arrays():
    assert arguments.describe(np.zeros((500, 2), "int32")) == \
        "ndarray of shape (500, 2) and dtype int32"
    assert arguments.describe(list(range(1000))) == "list of 1000 items"
    assert len(arguments.describe("x" * 500)) == 80
    with pytest.raises(ValueError, match=r"received ndarray of shape \(500,\)") as error:
        arguments.positive_int("steps", np.zeros(500, "int32"))
    assert len(str(error.value)) < 120


def test_options_are_checked_by_name():
    good = dict(checkpoint_dir=None, log_dir=None, checkpoint_every=None, keep_checkpoints=2,
                seed=None, log_every=1, skip_on_resume=True, verbose=1,
                override_learning_rate=False, check_numerics=False)
    assert arguments.check_options(**good)["keep_checkpoints"] == 2
    for name, value, error in (("seed", 1.5, TypeError), ("verbose", 3, ValueError),
                               ("verbose", True, ValueError), ("log_every", 0, ValueError),
                               ("check_numerics", 1, TypeError)):
        with pytest.raises(error, match=f"`{name}`"):
            arguments.check_options(**dict(good, **{name: value}))
    with pytest.raises(TypeError, match="`metrics` must be a list, received 'accuracy'"):
        arguments.check_list("metrics", "accuracy")


def test_fit_plan_targets():
    plan = arguments.FitPlan(None, None, None, None, 1, None)
    assert plan.epochs == 1
    plan.set_steps_per_epoch(5)
    assert plan.steps_per_epoch == 5 and plan.total_epochs(0) == 1
    plan = arguments.FitPlan(12, None, None, None, 1, None)
    plan.set_steps_per_epoch(5)
    assert plan.total_epochs(0) == 3
    plan.proxy = SimpleNamespace(stop_training=False)
    assert not plan.done(SimpleNamespace(step=11, epoch=2))
    assert plan.done(SimpleNamespace(step=12, epoch=2))
    with pytest.raises(ValueError, match="infinite: pass `steps`"):
        arguments.FitPlan(None, 2, None, None, 1, None).set_steps_per_epoch(float("inf"))
    with pytest.raises(ValueError, match="`validation_freq` must be an integer >= 1"):
        arguments.FitPlan(None, None, None, None, 0, None)
