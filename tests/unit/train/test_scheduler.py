"""LR schedule shapes: warmup, each decay to min_lr_ratio, WSD, clamping, and the LambdaLR wiring."""

import math

import pytest
import torch

from neobert_pt.config.schema import SchedulerConfig
from neobert_pt.train.scheduler import build_scheduler, lr_factor


def curve(name, warmup=4, max_steps=20, min_lr_ratio=0.1, decay_steps=None):
    return [lr_factor(s, name=name, warmup_steps=warmup, max_steps=max_steps, min_lr_ratio=min_lr_ratio,
                      decay_steps=decay_steps) for s in range(max_steps)]


@pytest.mark.parametrize("name", ["cosine", "linear", "constant", "wsd"])
def test_warmup_is_linear_and_reaches_peak(name):
    c = curve(name)
    assert c[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert c[4] == pytest.approx(1.0)


def test_cosine_and_linear_end_at_min_ratio_and_decrease():
    for name in ("cosine", "linear"):
        c = curve(name)
        assert c[-1] == pytest.approx(0.1)
        assert all(a >= b for a, b in zip(c[4:], c[5:], strict=False))
    cos = curve("cosine")
    # midpoint of the decay (steps 4..19, span 15) is halfway between peak and floor
    assert lr_factor(4 + 7.5, name="cosine", warmup_steps=4, max_steps=20, min_lr_ratio=0.1) == pytest.approx(0.55)
    assert cos[10] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 6 / 15)))
    lin = curve("linear")
    assert lin[10] == pytest.approx(1 - 0.9 * 6 / 15)


def test_wsd_stable_then_decays_over_decay_steps():
    c = curve("wsd", decay_steps=5)
    assert c[4:15] == pytest.approx([1.0] * 11)
    assert c[15:] == pytest.approx([1 - 0.9 * k / 5 for k in range(1, 6)])
    default = curve("wsd", max_steps=100)  # default decay = 10% of the run
    assert default[89] == 1.0 and default[90] < 1.0 and default[99] == pytest.approx(0.1)


def test_constant_and_beyond_the_end():
    assert curve("constant")[4:] == [1.0] * 16
    assert lr_factor(500, name="cosine", warmup_steps=4, max_steps=20, min_lr_ratio=0.1) == pytest.approx(0.1)


def test_warmup_longer_than_run_is_clamped_with_warning(caplog):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    with caplog.at_level("WARNING"):
        sched = build_scheduler(opt, SchedulerConfig(name="cosine", warmup_steps=50, min_lr_ratio=0.1), max_steps=10)
    assert "does not fit" in caplog.text
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(2.0 / 9) and lrs[8] == pytest.approx(2.0)  # warmup clamped to 9 steps
    assert lrs[9] == pytest.approx(0.2)


def test_lambdalr_multiplies_each_groups_peak_and_resumes():
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p1], "lr": 1.0}, {"params": [p2], "lr": 0.01}], lr=1.0)
    cfg = SchedulerConfig(name="linear", warmup_steps=2, min_lr_ratio=0.0)
    sched = build_scheduler(opt, cfg, max_steps=10)
    for _ in range(5):
        opt.step()
        sched.step()
    expected = lr_factor(5, name="linear", warmup_steps=2, max_steps=10, min_lr_ratio=0.0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([expected, 0.01 * expected])
    opt2 = torch.optim.SGD([{"params": [p1], "lr": 1.0}, {"params": [p2], "lr": 0.01}], lr=1.0)
    sched2 = build_scheduler(opt2, cfg, max_steps=10)
    sched2.load_state_dict(sched.state_dict())
    opt2.param_groups[0]["lr"] = sched2.get_last_lr()[0]  # what a full load_state restores
    assert sched2.last_epoch == 5 and sched2.get_last_lr() == pytest.approx(sched.get_last_lr())
