"""The `standard` battery and its parts: APGD's step-size rule, linearised target ranking, diverse
starts — analytic cases first, then strength on a real model and the CLI default."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner
from conftest import run_eval

import attacks
from attacks.optimizers import APGD, apgd_checkpoints
from robusteval.cli import cli
from robusteval.data import load_dataset
from robusteval.evaluation import build_battery
from robusteval.models import load_model


def linear_model(d: int, classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, classes)).eval()


def _corner(x, c, eps, bounds):
    """argmax of c·x' over the L∞ ball ∩ box: each coordinate at the face its sign points to."""
    lo, hi = (x - eps).clamp(min=bounds[0]), (x + eps).clamp(max=bounds[1])
    return torch.where(c > 0, hi, lo)


# ------------------------------------------------------------------------------------------- APGD


def test_apgd_checkpoints_follow_the_published_rule():
    # p: 0, .22, .41, .57, .70, .80, .87, .93, .99 (gaps shrink by .03 down to .06)
    assert apgd_checkpoints(100) == (22, 41, 57, 70, 80, 87, 93, 99)
    assert apgd_checkpoints(1000)[:3] == (220, 410, 570)
    assert all(0 < w < 10 for w in apgd_checkpoints(10))


def _scripted(values_per_step: list[list[float]], steps: int = 100):
    """Drive the APGD rule with scripted objective values (2 examples, constant gradient); return the
    step size of each example after every step and the proposals."""
    opt = APGD()
    x = torch.zeros(2, 3)
    state = opt.init(x, steps=steps, box=(x - 1.0, x + 1.0))
    etas, proposals = [], []
    for t, vals in enumerate(values_per_step):
        xt = torch.full((2, 3), float(t))  # a distinct iterate per step: the restart point is visible
        prop, state = opt.step(xt, torch.ones(2, 3), torch.tensor(vals), state, 0.5)
        etas.append(state.eta.clone())
        proposals.append(prop)
    return etas, proposals


def test_apgd_halves_exactly_at_checkpoints_where_the_objective_stalls():
    steps = 100
    # example 0 rises at every step; example 1 is flat (never rises, never improves)
    etas, _ = _scripted([[float(t), 1.0] for t in range(steps)], steps)
    checks = apgd_checkpoints(steps)
    for t in range(steps):
        halvings = sum(1 for w in checks if w <= t)
        assert etas[t][0] == 0.5  # a rising objective never halves
        assert etas[t][1] == 0.5 / 2 ** halvings  # a flat one halves at every checkpoint


def test_apgd_halves_when_too_few_steps_rise_and_restarts_from_the_best_point():
    steps = 100
    # example 0: rises in only 10 of the first 22 steps (< 75%) but keeps improving its best;
    # example 1: rises in 18 of them (≥ 75%) and improves — no halving.
    vals = []
    for t in range(23):
        if t <= 20:
            a = float(t) if t % 2 == 0 else float(t) - 1.5  # rises at t = 2, 4, ..., 20
        else:
            a = 30.0 if t == 21 else 10.0  # the best point is iterate 21; iterate 22 falls back
        b = float(t) if t % 5 else float(t) - 0.5  # rises at every step
        vals.append([a, b])
    etas, props = _scripted(vals, steps)
    assert etas[21][0] == 0.5 and etas[22][0] == 0.25  # 11 of 22 steps rose (< 75%): halved at 22
    assert etas[22][1] == 0.5
    # the halved example steps from its best iterate (21), with no momentum: z = clamp(21 + .25, −1, 1)
    # = 1 and 21 + 0.75·(1 − 21) = 6; the other steps on from iterate 22 with momentum from 21
    assert torch.allclose(props[22][0], torch.full((3,), 6.0))
    assert torch.allclose(props[22][1], torch.full((3,), 22 + 0.75 * (1.0 - 22) + 0.25 * (22 - 21)))


# ------------------------------------------------------------------------------ target ranking


def test_linearised_ranking_is_the_exact_boundary_distance_on_a_linear_model():
    d, classes = 20, 7
    model = linear_model(d, classes, seed=3)
    x = 0.3 + 0.4 * torch.rand(50, d, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = model(x)
    y = z.argmax(1)
    w = model[1].weight.detach()
    exact = torch.stack([(z.gather(1, y[:, None])[:, 0] - z[:, c]) / (w[y] - w[c]).abs().sum(1)
                         for c in range(classes)], 1)
    dist = attacks.linearised_distance(model, x, y)
    other = torch.ones_like(dist, dtype=torch.bool).scatter_(1, y[:, None], False)
    torch.testing.assert_close(dist[other], exact[other], rtol=1e-5, atol=1e-6)
    ranked = attacks.RankedTargets(3, all=True, by="linearised").assign(z, y, torch.arange(50), 0, classes,
                                                                        model=model, x=x)
    expected = exact.masked_fill(~other, float("inf")).argsort(1)[:, :3]
    assert torch.equal(ranked, expected)
    assert (ranked != y[:, None]).all()
    by_logit = attacks.RankedTargets(3, all=True).assign(z, y, torch.arange(50), 0, classes)
    assert not torch.equal(by_logit, ranked)  # the two rankings differ on this model


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_closeness_is_the_exact_distance_to_another_class_over_eps_on_a_linear_model(norm):
    d, classes, eps = 20, 7, 0.05
    model = linear_model(d, classes, seed=5)
    x = 0.3 + 0.4 * torch.rand(200, d, generator=torch.Generator().manual_seed(1))  # the box never binds
    with torch.no_grad():
        z = model(x)
    y = z.argmax(1)
    w = model[1].weight.detach()
    dual = 1 if norm == "linf" else 2  # ‖·‖ dual to the threat's norm
    pair = torch.stack([(z.gather(1, y[:, None])[:, 0] - z[:, c]) / (w[y] - w[c]).norm(p=dual, dim=1)
                        for c in range(classes)], 1)
    exact = pair.masked_fill(torch.nn.functional.one_hot(y, classes).bool(), float("inf")).amin(1)
    threat = attacks.threat_of(eps) if norm == "linf" else attacks.L2Ball(eps * 4)
    near = attacks.closeness(model, x, y, threat)
    torch.testing.assert_close(near, exact / threat.eps, rtol=1e-5, atol=1e-6)
    assert torch.equal(attacks.closeness(nn.Sequential(model, _Scale(7.0)), x, y, threat) > 1, near > 1)
    # a score below 1 is exactly a breakable example: targeted APGD finds the flip inside the ball, and
    # nothing does above 1 (the ball does not reach the other class's region); a band around 1 is left out
    clear = (near - 1).abs() > 0.05
    assert (near[clear] < 1).any() and (near[clear] > 1).any()
    res = attacks.run(attacks.get("apgd-t", threat), model, x, y, seed=0)
    assert torch.equal(res.success[clear], (near < 1)[clear])


class _Scale(nn.Module):
    def __init__(self, k: float):
        super().__init__()
        self.k = k

    def forward(self, z):
        return self.k * z


# ---------------------------------------------------------------------------------- diverse starts


def test_diverse_starts_stay_in_the_ball_depend_only_on_the_example_and_differ_from_uniform():
    model = linear_model(16, 5, seed=0)
    x = torch.rand(12, 16, generator=torch.Generator().manual_seed(1))
    threat = attacks.LinfBall(0.1)
    start = attacks.DiverseStart(2)
    ids = list(range(40, 52))
    full = start(x, threat, attacks.generators(0, ids, 0), model=model)
    assert bool(threat.contains(full, x).all())
    part = start(x[5:], threat, attacks.generators(0, ids[5:], 0), model=model)
    assert torch.equal(part, full[5:])
    uniform = attacks.UniformStart()(x, threat, attacks.generators(0, ids, 0))
    assert (full != uniform).any(1).all()
    # two sign steps of size ε from inside the ball land on its faces wherever w·z has a gradient
    assert ((full - x).abs() >= 0.1 - 1e-6).float().mean() > 0.9
    with pytest.raises(ValueError, match="need the model"):
        start(x, threat, attacks.generators(0, ids, 0))


# ------------------------------------------------------------------------------------- the battery


def test_standard_battery_members_in_order():
    built = build_battery(["standard"], 0.1).attacks
    members = ["apgd-ce", "apgd-t", "apgd-dlr-odi", "apgd-ce-odi", "apgd-t-margin"]
    assert [a.name for a in built] == members
    assert [a.restarts for a in built] == [1, 1, 5, 5, 3]
    assert all(isinstance(a.start, attacks.DiverseStart) for a in built[1:])
    with_check = build_battery(["standard"], 0.1, checks=True)
    assert [a.name for a in with_check.attacks] == [*members, "square"]
    assert with_check.role(with_check.attacks[-1]) == "check" and with_check.check.steps == 999
    assert build_battery(["standard"], 0.1, checks=True, full_check=True).check.steps == 4999
    paper = build_battery(["paper"], 0.1).attacks
    assert [(a.name, a.steps, a.restarts) for a in paper] == [
        ("untargeted", 200, 20), ("random-targeted", 200, 20), ("multi-targeted", 200, 20)]
    for atk in built:
        assert attacks.from_config(atk.config()) == atk


def _linear_case(n: int, d: int, classes: int, eps: float, seed: int):
    """A multiclass linear model, inputs, their labels (its predictions) and each input's exact best
    margin over the L∞ ball ∩ [0, 1]: the largest over the wrong classes t of the margin at the corner
    that maximises z_t − z_y."""
    model = linear_model(d, classes, seed=seed)
    x = torch.rand(n, d, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        y = model(x).argmax(1)
    w = model[1].weight.detach()
    best = torch.full((n,), -float("inf"))
    for t in range(classes):
        with torch.no_grad():
            best = torch.maximum(best, attacks.margin_of(model(_corner(x, w[t] - w[y], eps, (0.0, 1.0))), y))
    return model, x, y, best


def test_standard_battery_matches_the_exact_optimum_of_a_multiclass_linear_model():
    eps = 0.08
    model, x, y, best = _linear_case(64, 10, 5, eps, seed=4)
    alive = torch.ones(64, dtype=torch.bool)
    for atk in build_battery(["standard"], eps).attacks:
        idx = alive.nonzero()[:, 0]
        res = attacks.run(atk, model, x[idx], y[idx], ids=idx, seed=0)
        alive[idx[res.success]] = False
    assert torch.equal(~alive, best > 0)
    assert alive.any() and (~alive).any()


def test_apgd_t_margin_reaches_the_exact_targeted_optimum_of_a_linear_model():
    """With 4 classes its 3 ranked targets are every wrong class, and on a linear model the pair margin
    z_t − z_y is maximised over the L∞ ball ∩ box at a known corner: the member breaks exactly the examples
    whose best corner is misclassified."""
    eps = 0.1
    model, x, y, best = _linear_case(80, 12, 4, eps, seed=7)
    atk = attacks.get("apgd-t-margin", eps)
    res = attacks.run(atk, model, x, y, seed=0)
    assert bool(atk.threat.contains(res.x_adv, x).all())
    clear = best.abs() > 1e-3  # away from the boundary itself
    assert torch.equal(res.success[clear], (best > 0)[clear])
    assert res.success.any() and (~res.success).any()


def test_standard_breaks_every_example_of_the_nominal_model():
    """zoo:fmnist-nominal is not robust at ε = 0.1: the battery must break all of the first 100."""
    model = load_model("zoo:fmnist-nominal").model.eval()
    ds = load_dataset("fashion-mnist", n=100)
    df = run_eval([("nominal", model)], ["standard"], 0.1, ds, batch_size=100, checks=False).records
    worst = df.groupby("example_id")["robust"].any()
    correct = df.groupby("example_id")["clean_correct"].first()
    assert correct.sum() > 80
    assert not worst.any()


def test_battery_result_does_not_depend_on_batch_size_or_order(tiny_ckpt):
    model = load_model(tiny_ckpt).model.eval()
    ds = load_dataset("fashion-mnist", n=60)

    rw = RowWise(model).eval()
    names = [a.replace(steps=10) for a in build_battery(["standard"], 0.01).attacks]

    def robust(dataset, batch):
        df = run_eval([("m", rw)], names, 0.01, dataset, batch_size=batch, checks=False).records
        cols = ["robust", "adv_pred", "restart", "target"]
        return df.set_index(["attack", "example_id"])[cols].sort_index()

    a = robust(ds, 60)
    assert a["robust"].any() and (~a["robust"]).any()
    perm = torch.randperm(60, generator=torch.Generator().manual_seed(0))
    b = robust(ds.subset(perm), 7)
    assert a.equals(b)


def test_reallocation_is_decided_per_example_and_gives_the_same_records_for_any_batch_or_order(tiny_ckpt):
    model = load_model(tiny_ckpt).model.eval()
    ds = load_dataset("fashion-mnist", n=60)
    rw = RowWise(model).eval()
    battery = build_battery(["standard"], 0.01)
    gates = dict(zip((a.name for a in battery.members), battery.gates, strict=True))
    assert [g is None for g in gates.values()] == [True, False, False, False, False]

    def records(dataset, batch):
        df = run_eval([("m", rw)], ["standard"], 0.01, dataset, steps=10, batch_size=batch,
                      checks=False).records
        return df.drop(columns=["seconds"]).set_index(["attack", "example_id"]).sort_index()

    a = records(ds, 60)
    status = a["status"].unstack(0)
    assert (status == "gated").any().any() and (status[["apgd-t", "apgd-dlr-odi"]] == "attacked").any().any()
    # every decision follows the recorded scores: a survivor runs a gated member iff the smallest closeness
    # that the members before it recorded is at most the gate
    order = [a.name for a in battery.members]
    near = a["closeness"].unstack(0)[order]
    for i, name in enumerate(order):
        if gates[name] is None:
            continue
        best = near[order[:i]].min(axis=1)
        came = status[name].isin(["attacked", "gated"])
        assert ((status[name] == "gated") == (came & (best > gates[name]))).all(), name
    b = records(ds.subset(torch.randperm(60, generator=torch.Generator().manual_seed(0))), 7)
    assert a.drop(columns=["closeness"]).equals(b.drop(columns=["closeness"]))
    near_a, near_b = (torch.tensor(t["closeness"].to_numpy()) for t in (a, b))  # (per-row passes)
    torch.testing.assert_close(near_a, near_b, rtol=1e-5, atol=1e-7, equal_nan=True)


def test_cli_default_runs_standard_and_prints_one_column_per_member(tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(cli, ["attack", "-m", "zoo:fmnist-adv2", "--n", "50", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    header = next(line for line in res.output.splitlines() if "APGD-CE" in line)
    cells = [c.strip() for c in header.replace("┃", "|").split("|")]
    for column in ("APGD-CE", "APGD-T", "APGD-DLR-ODI", "APGD-CE-ODI", "Square", "Worst case"):
        assert column in cells, header
    assert "Untargeted" not in res.output


# ------------------------------------------------------------------------- cadence and precision


@pytest.mark.parametrize("preset", ["untargeted", "apgd-t", "multi-targeted"])
def test_compaction_cadence_does_not_change_results(preset):
    model = load_model("zoo:fmnist-adv2").model.eval()
    ds = load_dataset("fashion-mnist", n=40)
    atk = attacks.get(preset, 0.1, steps=12, restarts=2)
    x, y, ids = ds.images, ds.labels.long(), ds.ids
    every = attacks.run(atk, model, x, y, ids=ids, seed=1)
    assert every.success.any() and not every.success.all()
    for compact in (5, False):
        other = attacks.run(atk, model, x, y, ids=ids, seed=1, compact=compact)
        for field in ("x_adv", "success", "steps", "run", "target", "margin"):
            assert torch.equal(getattr(other, field), getattr(every, field)), (compact, field)
        assert other.forward_rows > every.forward_rows  # solved rows kept stepping until compaction


class RoundsUnderAutocast(nn.Module):
    """Its class-1 logit crosses class 0's only when the input is rounded to bf16, as autocast would:
    x₀ ≤ 0.6 inside the ball, and bf16(0.6) = 0.6016 > 0.601."""

    def forward(self, x):
        v = x.flatten(1)[:, :1]
        if torch.is_autocast_enabled(x.device.type):
            v = v.to(torch.bfloat16).float()
        return torch.cat([torch.zeros_like(v), 1000 * (v - 0.601)], 1)


def test_a_point_that_fools_only_the_bf16_model_is_not_counted():
    x = torch.full((6, 1, 2, 2), 0.5)
    y = torch.zeros(6, dtype=torch.long)
    model = RoundsUnderAutocast().eval()
    atk = attacks.get("pgd-20", 0.1)
    res = attacks.run(atk, model, x, y, precision="bf16")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fooled_low = model(res.x_adv).argmax(1) != y
    assert fooled_low.all()  # the attack found the bf16-only points...
    assert not res.success.any()  # ...and the fp32 decision refused every one of them
    assert (res.margin < 0).all()
    ds = load_dataset("fashion-mnist", n=6)
    ds.images[:] = 0.5
    ds.labels[:] = 0
    df = run_eval([("r", model)], ["pgd-20"], 0.1, ds, checks=False, precision="bf16").records
    assert df["robust"].all() and set(df["mode"]) == {"skip+bf16"}


def test_bf16_attack_on_a_real_model_counts_only_fp32_verified_points():
    model = load_model("zoo:fmnist-adv2").model.eval()
    ds = load_dataset("fashion-mnist", n=60)
    x, y, ids = ds.images, ds.labels.long(), ds.ids
    atk = attacks.get("apgd-ce", 0.1, steps=20)
    low = attacks.run(atk, model, x, y, ids=ids, precision="bf16")
    with torch.no_grad():
        pred = model(low.x_adv).argmax(1)
    assert low.success.any()
    assert torch.equal(low.success, pred != y)  # success is exactly the fp32 re-classification
    full = attacks.run(atk, model, x, y, ids=ids)
    assert abs(int(low.success.sum()) - int(full.success.sum())) <= 3  # bf16 gradients: same strength ±
    with pytest.raises(ValueError, match="precision"):
        attacks.run(atk, model, x, y, precision="int8")


class RowWise(nn.Module):
    """Evaluates its inner model one example at a time: outputs cannot depend on the batch (CPU kernels
    round differently for some batch sizes, which no attack code can change)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return torch.cat([self.inner(x[i:i + 1]) for i in range(len(x))]) if len(x) else self.inner(x)


@pytest.mark.parametrize("preset", ["untargeted", "multi-targeted", "apgd-t", "square"])
def test_tiled_restarts_give_the_sequential_result(preset):
    model = RowWise(load_model("zoo:fmnist-adv2").model.eval()).eval()
    ds = load_dataset("fashion-mnist", n=30)
    steps = 40 if preset == "square" else 8
    atk = attacks.get(preset, 0.1, steps=steps, restarts=4)
    x, y, ids = ds.images, ds.labels.long(), ds.ids
    seq = attacks.run(atk, model, x, y, ids=ids, seed=2, tile=False)
    assert seq.success.any() and not seq.success.all() and (seq.run > 0).any()
    for tile, compact in ((4, True), (3, 3), (True, True)):
        tiled = attacks.run(atk, model, x, y, ids=ids, seed=2, tile=tile, compact=compact)
        for field in ("x_adv", "success", "steps", "run", "target", "margin", "value"):  # NaN: clean-wrong
            torch.testing.assert_close(getattr(tiled, field), getattr(seq, field), rtol=0, atol=0,
                                       equal_nan=True, msg=f"{field}, tile={tile}, compact={compact}")
        if tile == 4:
            assert tiled.forward_rows > seq.forward_rows  # all four runs did go side by side


# -------------------------------------------------------------------------------- runs that stall


class Flat(nn.Module):
    """Logits that barely move in the ball: class 0 leads by 1 everywhere, so no run can make progress."""

    def forward(self, x):
        v = 1e-6 * x.flatten(1).sum(1, keepdim=True)
        return torch.cat([1.0 + v, v, -v, 0 * v], 1)


def test_stall_rule_is_validated_and_round_trips():
    for bad in ({"start": 0.1, "window": 0.2}, {"start": 1.0}, {"every": 0.0}, {"factor": 0.0},
                {"factor": float("inf")}, {"floor": -0.1}, {"floor": float("nan")}):
        with pytest.raises(ValueError, match="stall rule"):
            attacks.Stall(**bad)
    atk = attacks.presets.FORMS["standard-v9"](attacks.get("apgd-dlr-odi", 0.1))
    assert atk.stall == attacks.presets.STALL and "stall=Stall(" in atk.config()
    assert attacks.from_config(atk.config()) == atk
    assert "stall" not in attacks.get("apgd-dlr-odi", 0.1).config()  # earlier configurations keep their text
    with pytest.raises(ValueError, match="Evasion"):
        attacks.get("local-linearity", 0.1).replace(stall=attacks.Stall())
    assert attacks.Stall().checkpoints(100) == (20, set(range(40, 100, 10)))
    assert attacks.Stall().checkpoints(3) == (1, set())  # too short to judge: every step is taken


def test_a_run_that_cannot_progress_stops_at_the_first_decision_and_keeps_its_point():
    x = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(5, dtype=torch.long)
    atk = attacks.get("apgd-dlr-odi", 0.1, steps=50, restarts=3)
    full = attacks.run(atk, Flat().eval(), x, y, seed=0)
    stalled = attacks.run(atk.replace(stall=attacks.Stall()), Flat().eval(), x, y, seed=0)
    assert torch.equal(full.steps, torch.full((5,), 3 * 50))
    assert torch.equal(stalled.steps, torch.full((5,), 3 * 20))  # each run ends at step 0.4 · 50
    assert not stalled.success.any() and bool(atk.threat.contains(stalled.x_adv, x).all())


@pytest.mark.parametrize("name", ["apgd-t", "apgd-dlr-odi", "apgd-t-margin"])
def test_stalled_runs_lose_no_example_of_the_exact_linear_optimum(name):
    """On a linear model every run that can break its example climbs to it; the runs whose best corner
    is not adversarial level off below the boundary, and the far ones stop early. With the stall rule a
    member breaks exactly the examples whose exact L∞ optimum is misclassified, in fewer steps."""
    eps = 0.1
    model, x, y, best = _linear_case(80, 12, 4, eps, seed=7)
    v8 = attacks.presets.FORMS["standard-v8"](attacks.get(name, eps))
    v9 = v8.replace(stall=attacks.presets.STALL)
    assert attacks.presets.FORMS["standard-v9"](attacks.get(name, eps)) == \
        (v9 if name in attacks.presets.STALLING else v8)
    a, b = (attacks.run(atk, model, x, y, seed=0) for atk in (v8, v9))
    clear = best.abs() > 1e-3
    assert torch.equal(b.success[clear], (best > 0)[clear]) and torch.equal(b.success, a.success)
    assert int(b.steps[~b.success].sum()) < int(a.steps[~a.success].sum())


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 1.5), ("l1", 8.0)])
def test_stall_decisions_are_per_example_whatever_the_batch_order_cadence_or_tiling(norm, eps):
    atk = attacks.presets.FORMS["standard-v9"](attacks.get("apgd-dlr-odi", eps, norm=norm, steps=20,
                                                           restarts=2))
    _decisions_are_per_example(atk, atk.replace(stall=None), n=40, part=13, compact=4, tile=2)


def _decisions_are_per_example(atk, without, n: int, part: int, compact: int | None, tile: int):
    """``atk`` (with an early-stopping rule) and ``without`` (the same attack without it) on the first
    ``n`` bundled images: the rule stops some runs and keeps some breaks, and every example's result is the
    same for a permuted batch, the first ``part`` of it, another compaction cadence and tiling."""
    model = RowWise(load_model("zoo:fmnist-adv2").model.eval()).eval()
    ds = load_dataset("fashion-mnist", n=n)
    x, y, ids = ds.images, ds.labels.long(), ds.ids
    ref = attacks.run(atk, model, x, y, ids=ids, seed=1)
    full = attacks.run(without, model, x, y, ids=ids, seed=1)
    assert ref.success.any() and not ref.success.all()
    assert int(ref.steps.sum()) < int(full.steps.sum())  # some runs did stop early
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    head = perm[:part]
    runs = [(attacks.run(atk, model, x[perm], y[perm], ids=ids[perm], seed=1), perm),
            (attacks.run(atk, model, x[head], y[head], ids=ids[head], seed=1), head),
            (attacks.run(atk, model, x, y, ids=ids, seed=1, tile=tile), None)]
    if compact is not None:
        runs.append((attacks.run(atk, model, x, y, ids=ids, seed=1, compact=compact), None))
    for k, (res, order) in enumerate(runs):
        want = ref if order is None else _take(ref, order)
        for field in ("x_adv", "success", "steps", "run", "margin"):
            assert torch.equal(getattr(res, field), getattr(want, field)), (k, field)


def test_search_stall_rule_is_validated_and_round_trips():
    for bad in ({"start": 0.1, "window": 0.2}, {"start": 1.0}, {"every": 0.0}, {"factor": 0.0},
                {"factor": float("inf")}, {"floor": 0.9}, {"floor": float("nan")}):
        with pytest.raises(ValueError, match="search stall rule"):
            attacks.SearchStall(**bad)
    fab = attacks.presets.FORMS["standard-v12"](attacks.get("fab-t", 2.0, norm="l2"))
    assert fab.search_stall == attacks.presets.SEARCH_STALL and "search_stall=SearchStall(" in fab.config()
    assert attacks.from_config(fab.config()) == fab
    assert "search_stall" not in attacks.presets.FORMS["standard-v11"](attacks.get("fab-t", 2.0)).config()
    with pytest.raises(ValueError, match="nearest point"):  # an ascent keeps its highest objective
        attacks.get("apgd-ce", 8.0, norm="l1").replace(anneal=((3.0, 0.5),),
                                                       search_stall=attacks.SearchStall())
    with pytest.raises(ValueError, match="nearest point"):  # no search stage to end
        attacks.get("fab-t", 2.0, norm="l2").replace(anneal=(), search_stall=attacks.SearchStall())
    assert attacks.SearchStall().checkpoints(80) == (16, set(range(24, 80, 8)))


def test_a_search_that_finds_no_adversarial_point_stops_at_the_first_decision():
    """On logits that barely move, FAB's search finds nothing within 10ε: with the rule each target's
    search ends at 0.3 · 80 steps, hands on its point, which the ε-ball check then evaluates."""
    x = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(5, dtype=torch.long)
    fab = attacks.presets.FORMS["standard-v11"](attacks.get("fab-t", 0.1))
    full = attacks.run(fab, Flat().eval(), x, y, seed=0)
    ended = attacks.run(fab.replace(search_stall=attacks.SearchStall()), Flat().eval(), x, y, seed=0)
    assert torch.equal(full.steps, torch.full((5,), 3 * 80))  # three wrong classes, 80 search steps each
    assert torch.equal(ended.steps, torch.full((5,), 3 * 24))
    assert not ended.success.any() and bool(fab.threat.contains(ended.x_adv, x).all())


@pytest.mark.parametrize("norm, eps", [("l2", 1.5), ("l1", 8.0)])
def test_search_stall_decisions_are_per_example_whatever_the_batch_order_or_tiling(norm, eps):
    atk = attacks.presets.FORMS["standard-v12"](attacks.get("fab-t", eps, norm=norm, steps=15))
    _decisions_are_per_example(atk, atk.replace(search_stall=None), n=24, part=9, compact=None, tile=3)


def _take(res, order):
    return type(res)(**{f: (getattr(res, f)[order] if isinstance(getattr(res, f), torch.Tensor) and
                            getattr(res, f).ndim else getattr(res, f)) for f in res.__dataclass_fields__})


def test_probe_is_validated_and_round_trips():
    l1 = attacks.presets.FORMS["standard-v10"](attacks.get("apgd-ce", 8.0, norm="l1"))
    assert l1.probe == attacks.presets.PROBE and "probe=10" in l1.config()
    assert attacks.from_config(l1.config()) == l1
    assert "probe" not in attacks.get("apgd-ce", 8.0, norm="l1").config()  # earlier configurations keep text
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="probe must be"):
            l1.replace(probe=bad)
    with pytest.raises(ValueError, match="radius annealing"):  # nothing to probe without annealing stages
        attacks.get("apgd-ce", 0.1).replace(probe=5)
    with pytest.raises(ValueError, match="at most 1"):
        attacks.get("apgd-ce", 0.1).replace(anneal=((3.0, 0.6), (2.0, 0.5)))
    # v10 probes the L1 first pass only: the other members, and apgd-ce in L∞ and L2, are v9's
    for norm, eps in (("linf", 0.1), ("l2", 2.0), ("l1", 8.0)):
        for name in ("apgd-ce", "apgd-t", "apgd-dlr-odi"):
            v9, v10 = (attacks.presets.FORMS[v](attacks.get(name, eps, norm=norm))
                       for v in ("standard-v9", "standard-v10"))
            probed = (name, norm) == ("apgd-ce", "l1")
            assert v10 == (v9.replace(probe=attacks.presets.PROBE) if probed else v9)


def test_probes_add_breaks_leave_the_other_rows_untouched_and_decide_per_example():
    """A probe evaluates an annealing iterate's projection onto the ε-ball without moving the iterate: the
    rows it breaks end early with a point in the ball that the fp32 model misclassifies, every other row
    runs exactly as without probes, and the decisions do not depend on the batch, its order, the
    compaction cadence or tiling."""
    model = RowWise(load_model("zoo:fmnist-adv2").model.eval()).eval()
    ds = load_dataset("fashion-mnist", n=40)
    x, y, ids = ds.images, ds.labels.long(), ds.ids
    base = attacks.presets.FORMS["standard-v9"](attacks.get("apgd-ce", 8.0, norm="l1", steps=20, restarts=2))
    warm = sum(k for _, k in base.stages()[:-1])
    atk = base.replace(probe=3)
    plain, ref = (attacks.run(a, model, x, y, ids=ids, seed=1) for a in (base, atk))
    assert bool((ref.success | ~plain.success).all())  # every example broken without probes is broken
    early = ref.success & (ref.steps < warm)  # broken by a probe, inside the annealing stages
    assert int(early.sum()) >= 3 and not ref.success.all()
    assert int(ref.steps.sum()) < int(plain.steps.sum())
    same = ~ref.success
    for field in ("x_adv", "margin", "steps", "run", "value"):
        assert torch.equal(getattr(ref, field)[same], getattr(plain, field)[same]), field
    assert bool(atk.threat.contains(ref.x_adv, x).all())
    with torch.no_grad():
        assert bool((model(ref.x_adv[early]).argmax(1) != y[early]).all())
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    runs = [attacks.run(atk, model, x[perm], y[perm], ids=ids[perm], seed=1),
            attacks.run(atk, model, x[perm[:13]], y[perm[:13]], ids=ids[perm[:13]], seed=1),
            attacks.run(atk, model, x, y, ids=ids, seed=1, compact=4),
            attacks.run(atk, model, x, y, ids=ids, seed=1, compact=False),
            attacks.run(atk, model, x, y, ids=ids, seed=1, tile=2)]
    for k, (res, order) in enumerate(zip(runs, (perm, perm[:13], None, None, None), strict=True)):
        want = ref if order is None else _take(ref, order)
        for field in ("x_adv", "success", "steps", "run", "margin"):
            assert torch.equal(getattr(res, field), getattr(want, field)), (k, field)
