"""The randomised protocol (robusteval.randomness): EoT gradients, judgement over many draws, the
convergence check on the number of EoT samples, determinism, and the verdict."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import attacks
from robusteval import alarms, randomness, records, runs
from robusteval.cli import cli
from robusteval.models import load_model


class NoisyInput(nn.Module):
    """Gaussian noise of standard deviation ``sigma`` added to the input, drawn from the global RNG (as a
    user's randomised defence would), then the wrapped network."""

    def __init__(self, net: nn.Module, sigma: float):
        super().__init__()
        self.net, self.sigma = net, sigma

    def forward(self, x):
        return self.net(x + self.sigma * torch.randn_like(x))


def test_eot_gradient_is_the_expected_gradient_of_a_noisy_linear_model():
    """z = W(x + σε): the expected input gradient of the cross-entropy is E[Wᵀ(softmax(z) − e_y)], which a
    large independent Monte-Carlo estimate gives to high precision. EoT's K-sample average must agree
    within 5 of its own standard errors, coordinate by coordinate; a single draw must not."""
    torch.manual_seed(0)
    d, c, sigma = 6, 4, 0.5
    lin = nn.Linear(d, c).double()
    x = torch.rand(3, d, dtype=torch.float64)
    y = torch.tensor([0, 2, 3])
    model = NoisyInput(lin, sigma)
    ce = attacks.CrossEntropy()

    def grad(draws: int, seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        leaf = x.clone().requires_grad_(True)
        _, value = attacks.eot_value(ce, model, leaf, x, y, {}, draws)
        (g,) = torch.autograd.grad(value.sum(), leaf)
        return g

    with torch.no_grad():  # the reference: 200,000 draws, each gradient in closed form
        eps = torch.randn(200_000, *x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
        p = torch.softmax(lin(x + sigma * eps), -1)
        per_draw = (p - nn.functional.one_hot(y, c).double()) @ lin.weight
        expected = per_draw.mean(0)
        spread = per_draw.std(0)
    k = 4000
    eot = grad(k, 1)
    stderr = spread / k ** 0.5
    assert ((eot - expected).abs() <= 5 * stderr + 1e-12).all()
    single = grad(1, 2)
    assert ((single - expected).abs() > 5 * stderr).any()  # one draw is far from the expectation


def test_judging_over_draws_counts_robust_only_if_every_draw_is_correct():
    """A model that answers the label with probability 1 − p per draw: share ≈ 1 − p, worst case robust
    only where p = 0; the recorded prediction is the label only when every draw gives it."""

    class Flaky(nn.Module):
        def __init__(self, p):
            super().__init__()
            self.register_buffer("p", p)

        def forward(self, x):
            n = x.shape[0]
            wrong = torch.rand(n) < self.p.repeat_interleave(n // len(self.p))
            label, other = torch.zeros(n, 3), torch.zeros(n, 3)
            label[:, 0], other[:, 2] = 1.0, 1.0
            return torch.where(wrong[:, None], other, label)

    p = torch.tensor([0.0, 0.3, 1.0])
    x, y = torch.zeros(3, 2), torch.zeros(3, dtype=torch.long)
    j = randomness.judge(Flaky(p), x, y, draws=400, seed=0, first_id=0)
    assert j.share[0] == 1 and abs(float(j.share[1]) - 0.7) < 0.08 and j.share[2] == 0
    assert j.pred.tolist() == [0, 2, 2]
    again = randomness.judge(Flaky(p), x, y, draws=400, seed=0, first_id=0)
    assert torch.equal(again.share, j.share)  # the global generator is forked and seeded: same draws


@pytest.fixture(scope="module")
def noisy(tiny_ckpt, tmp_path_factory):
    path = tmp_path_factory.mktemp("noisy") / "noisy.pt"
    net = load_model(tiny_ckpt).model.eval()
    torch.jit.script(NoisyInput(net, 0.03).eval()).save(str(path))
    return path


def _attack(model, npz, out, *extra):
    return ["attack", "-m", str(model), "--dataset", f"npz:{npz}", "-n", "32", "--eps", "0.05", "-a",
            "apgd-ce", "--steps", "5", "--queries", "30", "--batch-size", "16", "--draws", "8", "--eot-max",
            "8", "--device", "cpu", "-q", "--out", str(out), *extra]


def test_a_random_model_gets_the_randomised_protocol_and_a_rerun_gives_the_same_records(noisy, tiny_npz,
                                                                                         tmp_path):
    first = CliRunner().invoke(cli, _attack(noisy, tiny_npz, tmp_path / "a"))
    assert first.exit_code == 0, first.output  # converged: no alarm, the protocol is in the table
    assert "Expected" in first.stdout and "EoT" in first.stdout and "judged over 8 draws" in first.stdout
    df = records.read(tmp_path / "a")
    assert set(df["draws"]) == {8} and df["attack_config"].str.contains("draws=").all()
    verdicts = alarms.read(tmp_path / "a")
    assert not any(v.raised for v in verdicts)
    assert any(v.check == "randomness" and "evaluated with EoT" in v.detail for v in verdicts)
    assert any(v.check == alarms.EOT for v in verdicts)
    # robust (worst case) ⇒ every draw correct, clean and adversarial; the expected share is never lower
    attacked = df[df.status == "attacked"]
    assert (attacked["robust"] == ((attacked["robust_share"] == 1) & attacked["clean_correct"])).all()
    second = CliRunner().invoke(cli, _attack(noisy, tiny_npz, tmp_path / "b"))
    assert second.exit_code == 0
    a, b = (records.read(tmp_path / d).drop(columns="seconds") for d in ("a", "b"))
    assert a.equals(b)  # determinism: the model's own draws come from a forked, seeded generator
    assert runs.read(tmp_path / "a").complete


def test_not_converging_keeps_an_alarm_and_exits_3(noisy, tiny_npz, tmp_path, monkeypatch):
    monkeypatch.setattr(randomness, "TOLERANCE", -1.0)  # no doubling can settle (tolerance() < 0)
    result = CliRunner().invoke(cli, _attack(noisy, tiny_npz, tmp_path / "o"))
    assert result.exit_code == alarms.UNRELIABLE_EXIT, result.output
    assert "eot-convergence" in result.stdout and "still moving" in result.stdout


def test_the_number_of_eot_samples_doubles_until_robust_accuracy_settles(noisy, tiny_npz):
    from robusteval.data import load_npz

    ds = load_npz(tiny_npz)
    model = torch.jit.load(str(noisy)).eval()
    atk = attacks.get("apgd-ce", 0.05, steps=5)
    choice = randomness.choose_draws(atk, model, ds.images, ds.labels.long(), ds.ids, judge_draws=8, seed=0,
                                     eot_max=16)
    ks = [k for k, _ in choice.tried]
    assert ks == [2 ** i for i in range(1, len(ks) + 1)] and choice.draws == ks[-1] <= 16
    if choice.converged:
        assert abs(choice.tried[-1][1] - choice.tried[-2][1]) <= choice.tolerance
    assert all(0 <= ra <= 1 for _, ra in choice.tried)


def test_a_deterministic_model_keeps_the_deterministic_protocol(tiny_ckpt, tiny_npz, tmp_path):
    result = CliRunner().invoke(cli, _attack(tiny_ckpt, tiny_npz, tmp_path / "o"))
    assert result.exit_code == 0, result.output
    df = records.read(tmp_path / "o")
    assert set(df["draws"]) == {1} and not df["attack_config"].str.contains("draws=").any()
    assert "Expected" not in result.stdout and "Protocol" not in result.stdout
    attacked = df[df.status == "attacked"]
    assert (attacked["robust_share"] == attacked["robust"].astype(float)).all()
    assert (df["clean_share"] == df["clean_correct"].astype(float)).all()
