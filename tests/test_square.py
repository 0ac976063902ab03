"""Square: the gradient-free member of the engine — feasible, within its query budget,
deterministic whatever the batch, and able to break a model whose gradients are zero everywhere."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attacks
from attacks.square import WindowSchedule, window_side


class Quantised(nn.Module):
    """A linear classifier on the input rounded to 4 grey levels: its input gradient is exactly zero."""

    def __init__(self, seed: int = 0, classes: int = 5, side: int = 6):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(side * side, classes)

    def forward(self, x):
        return self.lin((torch.round(x * 3) / 3).flatten(1))


class Counting(nn.Module):
    """Counts the example rows the model is evaluated on."""

    def __init__(self, net):
        super().__init__()
        self.net, self.rows = net, 0

    def forward(self, x):
        self.rows += x.shape[0]
        return self.net(x)


def _data(n=24, side=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, side, side, generator=g)


def test_window_schedule_halves_at_the_published_fractions_of_the_run():
    sched = WindowSchedule(0.8)
    n = 10_000  # queries: step k proposes query k + 2
    assert sched(0, n - 1) == 0.8 and sched(10, n - 1) == 0.8
    assert sched(11, n - 1) == 0.4 and sched(51, n - 1) == 0.2
    assert sched(n - 2, n - 1) == pytest.approx(0.8 / 512)
    assert window_side(0.8, 28, 28) == 25 and window_side(1e-6, 28, 28) == 1 and window_side(1.0, 6, 6) == 5


def test_square_points_are_feasible_and_budget_is_one_forward_per_query():
    model = Counting(Quantised()).eval()
    x = _data()
    y = model.net(x).argmax(1)
    for queries in (1, 7, 40):
        model.rows = 0
        atk = attacks.get("square", 0.2, queries=queries)
        res = attacks.run(atk, model, x, y, seed=0)
        assert bool(atk.threat.contains(res.x_adv, x).all())
        # the clean pass, then at most one forward per query per example (fewer once it is broken)
        assert len(x) < model.rows <= len(x) * (1 + queries)
        assert int(res.steps.max()) <= queries - 1
    model.rows = 0
    never = attacks.get("square", 0.2, queries=40).replace(objective=attacks.Margin(clip=-1e9))
    res = attacks.run(never, model, x, y, seed=0, compact=False)
    assert model.rows == len(x) * (1 + 40)  # nothing stops early: exactly the budget


def test_square_is_deterministic_whatever_the_batch():
    model = Quantised().eval()
    x = _data(n=20)
    y = model(x).argmax(1)
    ids = torch.arange(100, 120)
    atk = attacks.get("square", 0.2, queries=60)
    full = attacks.run(atk, model, x, y, ids=ids, seed=3)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    shuffled = attacks.run(atk, model, x[perm], y[perm], ids=ids[perm], seed=3)
    assert torch.equal(shuffled.x_adv, full.x_adv[perm]) and torch.equal(shuffled.success, full.success[perm])
    parts = [attacks.run(atk, model, x[i:i + 7], y[i:i + 7], ids=ids[i:i + 7], seed=3)
             for i in range(0, 20, 7)]
    assert torch.equal(torch.cat([p.x_adv for p in parts]), full.x_adv)


def test_square_breaks_a_zero_gradient_model_that_every_gradient_preset_leaves_robust():
    model = Quantised().eval()
    x = _data(n=40)
    y = model(x).argmax(1)
    broken_by_gradients = torch.zeros(len(x), dtype=torch.bool)
    for name in ("untargeted", "random-targeted", "multi-targeted", "fgsm-20", "pgd-50"):
        atk = attacks.get(name, 0.15, steps=30, restarts=2) if name != "fgsm-20" else attacks.get(name, 0.15)
        broken_by_gradients |= attacks.run(atk, model, x, y, seed=0).success
    square = attacks.run(attacks.get("square", 0.15, queries=300), model, x, y, seed=0)
    only_square = square.success & ~broken_by_gradients
    assert int(only_square.sum()) >= 5, (int(square.success.sum()), int(broken_by_gradients.sum()))
    assert int(square.success.sum()) > int(broken_by_gradients.sum())
