"""The architecture's rules, checked: one import namespace, no import cycles, every option declared once.

These read the source (the import graph, with ast) and the real parsers; nothing here needs Kafka.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# the repository's folders and the osad.<part> they are imported as
PARTS = {"osad": "osad", "schemas": "osad.schemas", "runtime": "osad.runtime", "core": "osad.core",
         "collector": "osad.collector", "featurizer": "osad.featurizer", "detector": "osad.detector",
         "alerter": "osad.alerter"}


def project_modules() -> dict[str, Path]:
    """Every module of the project by its import name (osad.detector.cs -> detector/cs.py)."""
    mods = {}
    for folder, pkg in PARTS.items():
        for f in sorted((ROOT / folder).rglob("*.py")):
            rel = f.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            mods[".".join([pkg, *parts])] = f
    return mods


def imports_of(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """The project modules ``name`` imports, anywhere in the file (function-level imports count: a cycle
    hidden in a function is still a cycle), each with its line number."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    here = name if is_pkg else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # "from pkg import sub" names a module when pkg.sub is one; else the names live in pkg
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in known]
            targets = subs if subs and len(subs) == len(node.names) else [mod] + subs
        else:
            continue
        for t in targets:
            while t and t not in known:  # import a.b.c of a module a.b: the edge goes to a.b
                t = t.rpartition(".")[0]
            if t and t != name:
                out.append((t, node.lineno))
    return out


def test_every_module_is_imported_through_the_osad_namespace():
    """No file imports a part by its bare folder name (``import detector``, ``from core.x import``): it would
    load a second copy of the module from a source checkout and does not exist once installed."""
    bare = {p for p in PARTS if p != "osad"}
    bad = []
    files = [f for d in [*PARTS, "tests", "bench"] for f in (ROOT / d).rglob("*.py")]
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            bad += [f"{f.relative_to(ROOT)}:{node.lineno}: {n}" for n in names if n.split(".")[0] in bare]
    assert not bad, "import these as osad.<part>:\n" + "\n".join(bad)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (a list of nodes, first == last), or None.

    >>> find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    True
    >>> find_cycle({"a": {"b"}, "b": {"a"}})
    ['a', 'b', 'a']
    """
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycle_between_the_projects_modules():
    mods = project_modules()
    known = set(mods)
    graph = {name: {t for t, _ in imports_of(name, path, known)} for name, path in mods.items()}
    # a package's __init__ that re-exports its submodules is imported by them only through the package
    # prefix, which Python resolves without running the package twice: drop submodule -> own-package edges
    for name in graph:
        graph[name] = {t for t in graph[name] if not (name.startswith(t + ".") and t in mods and
                                                       mods[t].name == "__init__.py")}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_doctests_of_this_file():
    import doctest

    assert doctest.testmod(sys.modules[__name__]).failed == 0


@pytest.mark.slow
def test_an_install_puts_only_osad_at_the_top_of_site_packages(tmp_path):
    """``pip install`` into an empty folder: only the osad package, its dist-info and the console script."""
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--disable-pip-version-check", "--target", str(target), str(ROOT)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    top = sorted(p.name for p in target.iterdir())
    assert [n for n in top if n not in ("osad", "bin") and not (n.startswith("osad-") and n.endswith(".dist-info"))] == []
    assert (target / "bin" / "osad").exists() and (target / "osad" / "__init__.py").exists()
    for part in ("schemas", "runtime", "core", "collector", "featurizer", "detector", "alerter"):
        assert (target / "osad" / part / "__init__.py").exists(), part
    assert (target / "osad" / "collector" / "bpf" / "sched.c").exists()  # package data travels along
    # and it runs from there, away from the source tree
    r = subprocess.run([sys.executable, "-c", "import osad.detector.cs, osad.alerter.core, osad.collector.bpf.family as f;"
                        "print(osad.detector.cs.__file__); print(f.HERE)"],
                       capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert all(line.startswith(str(target)) for line in r.stdout.split()), r.stdout


def _walk(parser, path=("osad",)):
    """(command path, argparse action) for every action of every (sub)command."""
    import argparse

    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from _walk(sub, path + (name,))
        elif not isinstance(a, (argparse._HelpAction, argparse._VersionAction)):
            yield path, a


def test_every_option_of_every_command_is_one_declared_config_field(monkeypatch):
    """Each option and positional of each subcommand comes from exactly one field of a typed Config, which
    carries its help text and (options) its environment variable; --help shows both."""
    import dataclasses

    from osad.cli import build_parser
    from osad.runtime.config import Config

    for k in [k for k in __import__("os").environ if k.startswith("OSAD_")]:
        monkeypatch.delenv(k)
    commands, problems = set(), []
    per_parser: dict[tuple, dict] = {}
    for path, a in _walk(build_parser()):
        commands.add(path)
        where = " ".join(path) + " " + ("/".join(a.option_strings) or a.dest)
        decl = getattr(a, "osad_setting", None)
        if decl is None:
            problems.append(f"{where}: not declared in a Config")
            continue
        cls, name = decl
        assert issubclass(cls, Config), where
        fields = {f.name: f for f in dataclasses.fields(cls)}
        setting = fields[name].metadata["osad"]
        if not setting.help.strip():
            problems.append(f"{where}: {cls.__name__}.{name} has no help text")
        if a.option_strings:
            env = setting.env_for(name)
            if not env or not env.startswith("OSAD_"):
                problems.append(f"{where}: {cls.__name__}.{name} has no OSAD_* environment variable")
            elif env not in (a.help or ""):
                problems.append(f"{where}: --help does not name {env}")
            if setting.flag_for(name) not in a.option_strings:
                problems.append(f"{where}: flag differs from the declaration {setting.flag_for(name)}")
        seen = per_parser.setdefault(path, {})
        if (cls, name) in seen:
            problems.append(f"{where}: {cls.__name__}.{name} also declares {seen[(cls, name)]}")
        seen[(cls, name)] = where
    assert len(commands) >= 15, sorted(commands)  # the walk really reached the subcommands
    assert not problems, "\n".join(problems)
