"""trainer/schedule.py: warmup then constant, linear or cosine, as a pure function of the step."""
import math

import pytest

from qlora_kit.trainer.schedule import lr_at, warmup_steps

pytestmark = pytest.mark.unit


def test_warmup_steps_ratio_and_override():
    assert warmup_steps(100, 0.03) == 3
    assert warmup_steps(10, 0.03) == 1
    assert warmup_steps(100, 0.03, 7) == 7
    assert warmup_steps(100, 0.0) == 0


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_warmup_ramps_linearly_to_peak(kind):
    assert [lr_at(s, 1.0, 100, 4, kind) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_shapes_after_warmup():
    assert lr_at(50, 2e-4, 100, 0, "constant") == 2e-4
    assert lr_at(50, 1.0, 100, 0, "linear") == pytest.approx(0.5)
    assert lr_at(100, 1.0, 100, 0, "linear") == 0.0
    assert lr_at(60, 1.0, 110, 10, "cosine") == pytest.approx(0.5)
    assert lr_at(10, 1.0, 110, 10, "cosine") == 1.0
    assert lr_at(35, 1.0, 110, 10, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    with pytest.raises(ValueError, match="lr_scheduler='step'"):
        lr_at(0, 1.0, 10, 0, "step")
