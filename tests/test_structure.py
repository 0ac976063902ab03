"""Structure: uniform registries, stable configurations, one record format, clean layering."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import attacks
from robusteval import records
from robusteval.cli import cli
from robusteval.models import create_model, list_models

ROOT = Path(__file__).resolve().parent.parent


def _tiny_classifier():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 4)).eval()


@pytest.mark.parametrize("name", [*dict.keys(attacks.PRESETS), "pgd-3"])
def test_every_preset_builds_and_runs_through_the_same_call(name):
    assert name in attacks.PRESETS
    atk = attacks.PRESETS[name](attacks.LinfBall(0.1)).replace(steps=2, restarts=1)
    x = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    model = _tiny_classifier()
    res = attacks.run(atk, model, x, model(x).argmax(1), seed=0)
    assert res.x_adv.shape == x.shape and bool(atk.threat.contains(res.x_adv, x).all())


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(KeyError, match="known: .*pgd-K"):
        attacks.PRESETS["deepfool"]


@pytest.mark.parametrize("name", [*dict.keys(attacks.PRESETS), "pgd-7"])
def test_attack_config_is_stable_and_round_trips(name):
    atk = attacks.get(name, 8 / 255)
    text = atk.config()
    assert not re.search(r"0x[0-9a-f]+", text)  # no memory address: the same string in every run
    assert attacks.from_config(text) == atk
    if name != "local-linearity":  # no function field: the stable form is the plain repr
        # draws=1, anneal=(), stall=None, probe=0, search_stall=None, stream=0, polish=0 and MinNorm's
        # direction='l2' (the defaults of fields added later) are not written, at the top level or in a
        # nested attack (a start from another attack's point)
        shown = [f for f in atk.__dataclass_fields__
                 if f not in ("draws", "stall", "probe", "search_stall", "stream", "polish")
                 and not (f == "anneal" and atk.anneal == ())]  # fab-t anneals
        plain = ", ".join(f"{f}={getattr(atk, f)!r}" for f in shown)
        nested = plain.replace(", direction='l2')", ")").replace(
            ", draws=1, anneal=(), stall=None, probe=0, search_stall=None, stream=0, polish=0)", ")")
        assert text == nested
    stalled = atk.replace(stall=attacks.Stall()) if isinstance(atk.tracking, attacks.Evasion) else atk
    assert attacks.from_config(stalled.config()) == stalled
    assert attacks.from_config(atk.replace(draws=8).config()) == atk.replace(draws=8)
    if atk.optimizer.uses_gradient:
        annealed = atk.replace(anneal=((3.0, 0.3), (2.0, 0.3)))
        assert "anneal=((3.0, 0.3), (2.0, 0.3))" in annealed.config()
        assert attacks.from_config(annealed.config()) == annealed


def test_from_config_constructs_only_the_library_types():
    with pytest.raises(ValueError, match="unknown configuration type 'print'"):
        attacks.from_config("name='x', objective=print(), optimizer=None")
    with pytest.raises(ValueError, match="unknown function 'os.system'"):
        attacks.from_config("name='x', objective=os.system")


@pytest.mark.parametrize("arch", list_models())
def test_every_architecture_in_the_registry_builds(arch):
    model = create_model(arch)
    assert sum(p.numel() for p in model.parameters()) > 0


def _commands():
    return sorted(cli.commands)


@pytest.mark.parametrize("command", _commands())
def test_every_command_has_help_and_is_in_the_readme(command):
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output
    assert f"robusteval {command}" in (ROOT / "README.md").read_text()


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_nothing_outside_the_cli_imports_the_cli():
    library = [p for p in (ROOT / "robusteval").rglob("*.py")
               if "cli" not in p.relative_to(ROOT / "robusteval").parts[:1] and p.name != "__main__.py"]
    library += list((ROOT / "attacks").rglob("*.py"))
    assert len(library) > 10
    leaks = {str(p.relative_to(ROOT)): sorted(m for m in _imports(p) if m.startswith("robusteval.cli"))
             for p in library}
    assert {k: v for k, v in leaks.items() if v} == {}


def test_attacks_imports_nothing_from_the_application():
    for p in (ROOT / "attacks").rglob("*.py"):
        bad = [m for m in _imports(p) if m.split(".")[0] in ("robusteval", "pandas", "click", "rich")]
        assert bad == [], p


@pytest.mark.parametrize("eps", [8 / 255, 0.1, 1 / 3, 2 / 255, 0.031])
def test_eps_round_trips_exactly_in_both_record_formats(eps, tmp_path):
    base = {c: 0 for c in records.COLUMNS} | {"model": "m", "attack": "a", "eps": eps, "status": "attacked",
                                              "mode": "skip", "robust": True, "clean_correct": True,
                                              "draws": 1, "clean_share": 1.0, "robust_share": 1.0,
                                              "norm": "linf",
                                              "example_sha": "0" * 16}
    records.append(tmp_path / records.FILENAME, [base])
    assert records.read(tmp_path)["eps"].iloc[0] == eps
    row = {c: 0 for c in records.GAMMA_COLUMNS} | {"model": "m", "eps": eps, "eps_text": "8/255",
                                                    "clean_correct": True, "gamma": eps / 3,
                                                    "sqrt_gamma": (eps / 3) ** 0.5}
    records.append(tmp_path / records.GAMMA_FILENAME, [row], records.GAMMA)
    back = records.read_gamma(tmp_path).iloc[0]
    assert back["eps"] == eps and back["gamma"] == eps / 3 and back["eps_text"] == "8/255"


class _RandomSearchState(NamedTuple):
    incumbent: torch.Tensor  # best point so far per example
    value: torch.Tensor  # its objective (−inf before the first evaluation)
    gens: list  # one generator per example


@dataclass(frozen=True)
class _RandomSearch:
    """A gradient-free optimizer: accept the evaluated proposal where it improved, propose a random
    corner step from the incumbent. It plugs into the engine with no special case in the loop."""

    uses_gradient = False

    def init(self, x, generators=None, **run):
        return _RandomSearchState(x.clone(), torch.full((len(x),), float("-inf")), list(generators))

    def step(self, x, grad, value, state, lr):
        assert grad is None
        better = value > state.value
        incumbent = torch.where(better.view(-1, 1, 1, 1), x, state.incumbent)
        best = torch.where(better, value, state.value)
        signs = [torch.randint(0, 2, x.shape[1:], generator=g).float() * 2 - 1 for g in state.gens]
        noise = torch.stack(signs)
        return incumbent + lr * noise, _RandomSearchState(incumbent, best, state.gens)


def test_a_gradient_free_optimizer_runs_in_the_same_loop():
    torch.manual_seed(0)
    lin = nn.Linear(16, 3)
    calls = []

    def model(x):
        calls.append(x.requires_grad)
        return lin(x.flatten(1))

    x = torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    y = model(x).argmax(1)
    atk = attacks.Attack("random-search", attacks.Margin(), _RandomSearch(),
                         attacks.constant(1.0, relative=True), attacks.LinfBall(0.3), steps=30, restarts=1)
    res = attacks.run(atk, model, x, y, seed=0)
    assert not any(calls)  # no gradient was ever asked for
    assert bool(atk.threat.contains(res.x_adv, x).all())
    assert bool((res.margin >= attacks.margin_of(model(x), y)).all())  # never worse than the clean point
    assert res.success.any()  # a linear model at ε = 0.3 is breakable by corner search


def test_library_errors_name_arguments_and_the_cli_words_them_as_flags():
    from robusteval.errors import UserError

    err = UserError("pass `arch`=NAME, or enable `download`; `merge_runs` differs")
    assert str(err) == "pass arch=NAME, or enable download; merge_runs differs"
    assert err.as_flags() == "pass --arch=NAME, or enable --download; --merge-runs differs"
    library = [p for p in (ROOT / "robusteval").rglob("*.py")
               if "cli" not in p.relative_to(ROOT / "robusteval").parts]
    quoted = []
    for path in library:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "UserError":
                texts = [c.value for c in ast.walk(node)
                         if isinstance(c, ast.Constant) and isinstance(c.value, str)]
                quoted += [f"{path.name}: {t}" for t in texts if re.search(r"(^|\s)--[a-z]", t)]
    assert quoted == []


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _project_imports(path: Path, package: str) -> set[str]:
    """Every module a module imports, at the top or inside a function (a deferred import is still a
    dependency: two modules that import each other lazily are still one concept in two homes)."""
    names = set()
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + [base]).strip(".")
            names.add(base)
            names |= {f"{base}.{a.name}" for a in node.names}
    return names


def test_no_import_cycle():
    paths = [p for p in [*(ROOT / "attacks").rglob("*.py"), *(ROOT / "robusteval").rglob("*.py")]]
    modules = {_module_name(p): p for p in paths}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = {d for d in _project_imports(path, package) if d in modules and d != name}
        graph[name] = {d for d in deps if not name.startswith(d + ".")}  # a package imports its parts
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " → ".join([*trail[trail.index(dep):], dep]))
            if dep not in state:
                visit(dep, [*trail, dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


_DOC_REF = re.compile(r"docs/([a-z]+\.md)(?:,? \"([^\"]+)\")?")


def test_every_reference_points_inside_the_repository():
    text_files = [*ROOT.glob("*.md"), *ROOT.glob("Makefile"), *(ROOT / ".ci").glob("*"), *ROOT.glob("*.toml")]
    for folder in ("attacks", "robusteval", "tests", "benchmarks", "docs"):
        text_files += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".md", ".txt")]
    outside = re.compile(r"ALGORITHMS\.md|ARCHITECTURE\.md|STRENGTH\.md|[Dd]ecision [0-9]|[Pp]itfall [0-9]|"
                         r"shared/design|shared/reference")
    issue = re.compile(r"[Ii]ssue [0-9]")
    found = []
    for p in text_files:
        text = p.read_text(errors="replace")
        if p.name == "test_structure.py":
            continue
        found += [f"{p.relative_to(ROOT)}: {m.group(0)}" for m in outside.finditer(text)]
        if p.relative_to(ROOT) != Path("docs/history.md"):
            found += [f"{p.relative_to(ROOT)}: {m.group(0)}" for m in issue.finditer(text)]
        for m in _DOC_REF.finditer(text):  # every docs/ reference names a page and a section that exist
            page = ROOT / "docs" / m.group(1)
            assert page.is_file(), f"{p.relative_to(ROOT)} points to a missing {m.group(0)}"
            if m.group(2):
                headings = [line.lstrip("#").strip() for line in page.read_text().splitlines()
                            if line.startswith("#")]
                where = p.relative_to(ROOT)
                assert m.group(2) in headings, f"{where}: no section {m.group(2)!r} in {page.name}"
    assert found == []
    assert "docs/README.md" in (ROOT / "README.md").read_text()


def test_long_functions_say_why():
    """No function in robusteval/ is over 60 lines unless a ``# Long:`` comment in it says why."""
    long = []
    for path in (ROOT / "robusteval").rglob("*.py"):
        source = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(source))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = source[node.lineno - 1:node.end_lineno]
                if len(body) > 60 and not any(line.strip().startswith("# Long:") for line in body):
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({len(body)} lines)")
    assert long == []
