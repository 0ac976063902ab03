"""The recorded plan (robusteval.plan, robusteval.runs): written before any work, merged across
invocations, compared with the records and verdicts on disk — an interrupted run reads as incomplete."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import attacks
from robusteval import alarms, plan, records, runner, runs
from robusteval.cli import cli
from robusteval.errors import UserError


def _args(ckpt, npz, out, *extra, attack=("untargeted", "multi-targeted"), eps="0.05", n=16):
    names = [a for name in attack for a in ("-a", name)]
    return ["attack", "-m", str(ckpt), "--dataset", f"npz:{npz}", "-n", str(n), "--eps", eps, *names,
            "--steps", "3", "--restarts", "1", "--queries", "20", "--batch-size", "8", "--device", "cpu",
            "--out", str(out), "-q", *extra]


def _invoke(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _unit(model="m", eps=0.1, attacks_=(("a", "cfg-a"),), checks=()):
    planned = tuple(plan.PlannedAttack(n, c, "skip") for n, c in attacks_)
    return plan.Unit(model, "sha", eps, planned, checks)


def _plan(units=(), selected=4, seed=0, shas=("x0", "x1", "x2", "x3")):
    return plan.Plan("npz", "test", selected, None, seed, plan.data_key("npz", "test", range(selected)),
                     tuple(range(len(shas))), shas, tuple(units))


def test_a_plan_round_trips_and_a_damaged_one_is_one_clear_error(tmp_path):
    p = _plan([_unit(checks=("randomness",))])
    path = plan.write(tmp_path / "plan.json", p)
    assert plan.read(path) == p
    good = path.read_text()
    cases = {
        "truncated": good[: len(good) // 2],
        "not json": "plan: yes",
        "another format": json.dumps({**json.loads(good), "format": "other"}),
        "a list of ids that is not": json.dumps({**json.loads(good), "ids": "0,1"}),
        "an eps that is not a radius": good.replace('"eps": 0.1', '"eps": 7'),
        "unique ids": json.dumps({**json.loads(good), "ids": [0, 0, 1, 2]}),
        "binary": "\x00\xff",
    }
    for what, text in cases.items():
        path.write_text(text)
        with pytest.raises(UserError, match="plan") as err:
            plan.read(path)
        assert "\n" not in str(err.value), what


def test_merge_adds_units_and_refuses_what_would_mix_two_runs():
    old = _plan([_unit(eps=0.1)])
    grown = plan.merge(old, _plan([_unit(eps=0.2), _unit(eps=0.1, attacks_=(("b", "cfg-b"),))]))
    assert [u.key for u in grown.units] == [("m", 0.1), ("m", 0.2)]
    assert [a.name for a in grown.unit("m", 0.1).attacks] == ["a", "b"]  # an attack added to a unit
    with pytest.raises(UserError, match="different attack config"):
        plan.merge(old, _plan([_unit(attacks_=(("a", "other"),))]))
    with pytest.raises(UserError, match="another selection"):
        plan.merge(old, _plan([_unit()], selected=3, shas=("x0", "x1", "x2")))
    with pytest.raises(UserError, match="seed 0, not 1"):
        plan.merge(old, _plan([_unit()], seed=1))
    with pytest.raises(UserError, match="made on different data"):
        plan.merge(old, _plan([_unit()], shas=("x0", "y1", "x2", "x3")))


def test_coverage_names_what_is_missing():
    p = _plan([_unit(checks=("randomness", "batch-dependent"))])
    df = records.empty()
    gaps = plan.coverage(p, df, [alarms.Verdict("m", "sha", "randomness", 0.1, False, "")])
    assert {(g.what, g.done, g.total) for g in gaps} == {("a", 0, 4), ("checks", 1, 2)}


def test_records_not_in_the_plan_are_refused(tiny_ckpt, tiny_npz, tmp_path):
    out = tmp_path / "run"
    assert _invoke(_args(tiny_ckpt, tiny_npz, out, "--no-checks")).exit_code == 0
    df = records.read(out)
    row = df.iloc[0].to_dict() | {"attack": "fgsm-20"}  # a row of an attack this run never planned
    records.append(out / records.FILENAME, [row])
    result = _invoke(["report", out])
    assert result.exit_code != 0 and "not in the run's plan" in result.stderr


def test_killed_between_two_members_reads_incomplete_and_resuming_completes(tiny_ckpt, tiny_npz, tmp_path,
                                                                            monkeypatch):
    out = tmp_path / "run"
    real = attacks.run

    def killed_at_the_second_member(atk, *a, **kw):
        if atk.name == "multi-targeted":
            raise KeyboardInterrupt
        return real(atk, *a, **kw)

    monkeypatch.setattr(runner.attacks, "run", killed_at_the_second_member)
    cut = _invoke(_args(tiny_ckpt, tiny_npz, out, "--no-skip"))
    assert cut.exit_code == 130
    report = _invoke(["report", out])
    assert report.exit_code == plan.INCOMPLETE_EXIT, report.output
    assert "incomplete" in report.stdout and "INCOMPLETE" in report.stdout
    assert "multi-targeted" in report.stdout  # names what is missing
    header = next(line for line in report.stdout.splitlines() if line.startswith("┃"))
    row = next(line for line in report.stdout.splitlines() if line.startswith("│"))
    names, values = [c.strip() for c in header.split("┃")], [c.strip() for c in row.split("│")]
    cells = dict(zip(names, values, strict=True))
    assert cells["Worst case"] == "–" and cells["Alarms"] == "pending"  # nothing final about this row
    assert cells["Status"].startswith("incomplete")
    monkeypatch.setattr(runner.attacks, "run", real)
    again = _invoke(_args(tiny_ckpt, tiny_npz, out, "--no-skip"))
    assert again.exit_code == 0, again.output
    finished = _invoke(["report", out])
    assert finished.exit_code == 0 and "complete" in finished.stdout and "INCOMPLETE" not in finished.stdout


def test_killed_during_the_checks_reads_incomplete(tiny_ckpt, tiny_npz, tmp_path, monkeypatch):
    out = tmp_path / "run"

    def killed(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(alarms, "large_eps", killed)  # after the battery, before the post-check verdicts
    assert _invoke(_args(tiny_ckpt, tiny_npz, out)).exit_code == 130
    view = runs.read(out)
    assert [g.what for g in view.gaps] == ["checks"] and records.read(out)["attack"].nunique() == 3
    report = _invoke(["report", out])
    assert report.exit_code == plan.INCOMPLETE_EXIT and "checks without a verdict" in report.stdout
    monkeypatch.undo()
    assert _invoke(_args(tiny_ckpt, tiny_npz, out)).exit_code == 0
    assert runs.read(out).complete


def test_the_plan_is_written_before_any_attack(tiny_ckpt, tiny_npz, tmp_path, monkeypatch):
    out = tmp_path / "run"

    def first_attack(*a, **kw):
        assert (out / "plan.json").is_file() and (out / "alarms.csv").is_file()  # pre-check verdicts too
        raise KeyboardInterrupt

    monkeypatch.setattr(runner.attacks, "run", first_attack)
    assert _invoke(_args(tiny_ckpt, tiny_npz, out)).exit_code == 130
    p = plan.read(out / "plan.json")
    assert [a.name for a in p.units[0].attacks] == ["untargeted", "multi-targeted", "square"]
    assert p.units[0].attacks[-1].role == "check" and not p.units[0].attacks[-1].gradient
    assert set(p.units[0].checks) == set(alarms.PRE + alarms.POST) and len(p.ids) == 16
