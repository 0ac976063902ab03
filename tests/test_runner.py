"""The runner's contracts: verification, eval-mode guard, battery semantics, resume, records."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_eval

import attacks
from robusteval import records, reports, runner
from robusteval.data import load_npz
from robusteval.errors import UserError
from robusteval.models import load_model

EPS = 0.05
FAST = dict(steps=4, restarts=1, checks=False)  # the masking checks are tested in test_alarms.py
BATTERY = ["untargeted", "multi-targeted"]


@pytest.fixture()
def data(tiny_npz):
    return load_npz(tiny_npz, n=24)


def _evaluate(ckpt, data, out=None, **kw):
    kw = {"batch_size": 8, "device": "cpu", **FAST, **kw}
    names, eps = kw.pop("attack_names", BATTERY), kw.pop("eps", EPS)
    return run_eval([str(ckpt)], names, eps, data, out=out, **kw).records


def test_records_have_the_schema_and_are_verified(tiny_ckpt, data):
    df = _evaluate(tiny_ckpt, data)
    assert list(df.columns) == list(records.COLUMNS)
    assert len(df) == len(data) * len(BATTERY)
    assert set(df["status"]) <= set(records.STATUSES) and "attacked" in set(df["status"])
    att = df[df.status == "attacked"]
    assert (att["distance"] <= EPS + runner.TOLERANCE).all() and set(att["norm"]) == {"linf"}
    # robust ⇔ clean-correct and the verified point is classified as the label
    assert (df["robust"] == (df["clean_correct"] & (df["adv_pred"] == df["label"]))).all()
    assert not df.loc[df.status != "attacked", "robust"].any()
    assert (df.loc[df.status == "clean-wrong", "clean_correct"] == False).all()  # noqa: E712
    assert df["train_method"].eq("adversarial").all() and df["train_steps"].eq(2).all()
    # the tiny model is neither hopeless nor invulnerable, so the tests below mean something
    assert 0 < att["robust"].sum() < len(att)


def test_worst_case_is_per_example_all():
    base = {c: 0 for c in records.COLUMNS} | {"model": "m", "dataset": "d", "eps": 0.1, "mode": "no-skip",
                                              "clean_correct": True, "norm": "linf", "draws": 1}
    rows = [base | {"example_id": i, "attack": a, "robust": r}
            for i, (ra, rb) in enumerate([(True, True), (False, True), (True, False), (False, False)])
            for a, r in (("untargeted", ra), ("multi-targeted", rb))]
    table = reports.summarize(records.coerce(pd.DataFrame(rows)))
    row = table.iloc[0]
    got = (row["Nominal"], row["Untargeted"], row["Multi-Targeted"], row["Worst case"])
    assert got == (1.0, 0.5, 0.5, 0.25)
    md = reports.render(table, "markdown")
    assert "| m | 0.1 | 4 | 100.00% | 50.00% | 50.00% | 25.00% |" in md
    assert r"25.00\%" in reports.render(table, "latex")


def test_incomplete_attack_column_is_not_reported_as_a_number():
    # An interrupted run: multi-targeted has records for 2 of the 4 examples only. Its accuracy over the
    # recorded subset (and a worst case ignoring the missing rows) would be a wrong, optimistic number.
    base = {c: 0 for c in records.COLUMNS} | {"model": "m", "dataset": "d", "eps": 0.1, "mode": "no-skip",
                                              "clean_correct": True, "norm": "linf", "draws": 1}
    rows = [base | {"example_id": i, "attack": "untargeted", "robust": i < 3} for i in range(4)]
    rows += [base | {"example_id": i, "attack": "multi-targeted", "robust": True} for i in range(2)]
    table = reports.summarize(records.coerce(pd.DataFrame(rows)))
    row = table.iloc[0]
    assert row["Untargeted"] == 0.75
    assert pd.isna(row["Multi-Targeted"]) and pd.isna(row["Worst case"])
    assert "| m | 0.1 | 4 | 100.00% | 75.00% | – | – |" in reports.render(table, "markdown")


def test_model_is_unchanged(tiny_ckpt, data):
    model = load_model(tiny_ckpt).model
    model.train()  # the runner must evaluate in eval mode and restore train mode afterwards
    model.features[1].training = False  # ...and restore every module's own flag, not one global one
    flags = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    df = run_eval([("tiny", model)], BATTERY, EPS, data, batch_size=8, device="cpu", **FAST).records
    assert (df.status == "attacked").any()
    assert [m.training for m in model.modules()] == flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # includes BN running stats and num_batches_tracked
    assert all(p.grad is None for p in model.parameters())


def test_verification_failure_raises(tiny_ckpt, data, monkeypatch):
    real = attacks.run

    def broken(attack, model, x, y, **kw):
        res = real(attack, model, x, y, **kw)
        res.x_adv = x + 2 * attack.eps  # outside the ε-ball (and possibly outside [0, 1])
        return res

    monkeypatch.setattr(runner.attacks, "run", broken)
    with pytest.raises(runner.VerificationError, match="infeasible"):
        _evaluate(tiny_ckpt, data, attack_names=["untargeted"])


def _spy(monkeypatch):
    calls = {}
    real = attacks.run

    def spy(attack, model, x, y, *, ids=None, **kw):
        calls.setdefault(attack.name, set()).update(int(i) for i in ids)
        return real(attack, model, x, y, ids=ids, **kw)

    monkeypatch.setattr(runner.attacks, "run", spy)
    return calls


def test_battery_attacks_survivors_only_and_no_skip_attacks_all(tiny_ckpt, data, monkeypatch):
    calls = _spy(monkeypatch)
    df = _evaluate(tiny_ckpt, data)
    first = df[df.attack == "untargeted"].set_index("example_id")
    broken = set(first.index[first.clean_correct & ~first.robust])
    survivors = set(first.index[first.robust])
    assert broken, "the first attack should break something at this ε"
    assert calls["multi-targeted"] == survivors and not calls["multi-targeted"] & broken
    second = df[df.attack == "multi-targeted"].set_index("example_id")
    assert (second.loc[sorted(broken), "status"] == "skipped").all()
    assert set(df["mode"]) == {"skip"}

    calls.clear()
    df2 = _evaluate(tiny_ckpt, data, no_skip=True)
    clean_ok = set(first.index[first.clean_correct])
    assert calls["untargeted"] == calls["multi-targeted"] == clean_ok
    assert "skipped" not in set(df2["status"]) and set(df2["mode"]) == {"no-skip"}
    # per-example worst case is the same either way (same seeds per example)
    w1 = reports.summarize(df)["Worst case"].iloc[0]
    w2 = reports.summarize(df2)["Worst case"].iloc[0]
    assert w1 == w2


def test_resume_after_interruption_gives_the_same_records(tiny_ckpt, data, tmp_path, monkeypatch):
    full = _evaluate(tiny_ckpt, data, out=tmp_path / "full")
    real, count = attacks.run, {"n": 0}

    def dies_on_second_batch(*a, **kw):
        count["n"] += 1
        if count["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(runner.attacks, "run", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        _evaluate(tiny_ckpt, data, out=tmp_path / "cut")
    partial = records.read(tmp_path / "cut")
    assert 0 < len(partial) < len(full)
    calls = _spy(monkeypatch)
    resumed = _evaluate(tiny_ckpt, data, out=tmp_path / "cut")
    attacked = (partial.attack == "untargeted") & (partial.status == "attacked")
    done_before = set(partial.loc[attacked, "example_id"])
    assert calls["untargeted"] and not calls["untargeted"] & done_before, "recorded examples are not redone"
    cols = ["model", "attack", "example_id", "status", "adv_pred", "robust", "restart", "steps"]
    pd.testing.assert_frame_equal(resumed[cols], full[cols])
    np.testing.assert_allclose(resumed["margin"], full["margin"], rtol=1e-5, atol=1e-6)
    on_disk = records.read(tmp_path / "cut")
    assert len(on_disk) == len(full) and not on_disk.duplicated(list(records.KEY)).any()
    pd.testing.assert_frame_equal(reports.summarize(on_disk), reports.summarize(full))


def test_resume_refuses_a_changed_setup(tiny_ckpt, data, tmp_path):
    _evaluate(tiny_ckpt, data, out=tmp_path, attack_names=["untargeted"])
    with pytest.raises(UserError, match="different attack config"):
        _evaluate(tiny_ckpt, data, out=tmp_path, attack_names=["untargeted"], restarts=2)


def test_results_do_not_depend_on_batch_size(tiny_ckpt, data):
    a = _evaluate(tiny_ckpt, data, batch_size=5, attack_names=["untargeted"])
    b = _evaluate(tiny_ckpt, data, batch_size=24, attack_names=["untargeted"])
    assert a["robust"].tolist() == b["robust"].tolist() and a["adv_pred"].tolist() == b["adv_pred"].tolist()


def test_records_file_survives_a_torn_write(tmp_path):
    row = {c: 1 for c in records.COLUMNS} | {"model": "m", "attack": "a", "eps": 0.1, "robust": True,
                                              "success": False, "distance": 0.05, "status": "attacked",
                                              "mode": "skip", "norm": "linf", "clean_share": 1.0,
                                              "robust_share": 1.0}
    path = tmp_path / records.FILENAME
    records.append(path, [row | {"example_id": 0}, row | {"example_id": 1}])
    with open(path, "a") as f:
        f.write("m,abc,partial")  # a process killed mid-line
    with pytest.warns(RuntimeWarning, match="incomplete last line"):
        df = records.read(path)
    assert df["example_id"].tolist() == [0, 1] and df["robust"].all()
    records.append(path, [row | {"example_id": 2}])
    assert records.read(path)["example_id"].tolist() == [0, 1, 2]


def test_bad_inputs_are_user_errors(tiny_ckpt, nan_ckpt, data):
    with pytest.raises(UserError, match="unknown attack"):
        _evaluate(tiny_ckpt, data, attack_names=["nope"])
    with pytest.raises(UserError, match="non-finite logits"):
        _evaluate(nan_ckpt, data)
    with pytest.raises(UserError, match="ε must be"):
        _evaluate(tiny_ckpt, data, eps=-0.1)
