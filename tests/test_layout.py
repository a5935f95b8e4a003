"""The house rules, checked on the source: no import cycle, no import from a lower layer up to a
higher one (laten_ray -> actors -> jobs), and nothing that points outside the repository."""
from __future__ import annotations

import ast
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("laten_ray", "actors", "jobs")
LAYER = {"laten_ray": 0, "actors": 1, "jobs": 2}
# What users' clones do not have: the development folder beside the repository and its notes
# (spelled in pieces so that this file, which is checked too, does not contain them).
NEEDLES = ("/".join(("..", "shared")), "DESIGN" ".md", "this " "workspace")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path) -> set[str]:
    """Our modules that `path` imports, at module level or inside functions."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from x import y`: y may be a module
    return {m for m in found if m.split(".")[0] in PACKAGES}


def graph(root: Path = REPO) -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES if (root / pkg).is_dir() for p in (root / pkg).rglob("*.py")]
    modules = {module_name(p, root): p for p in files}
    return {m: {i for i in imports_of(p, root) if i in modules and i != m} for m, p in modules.items()}


def upward_imports(g: dict[str, set[str]]) -> list[tuple[str, str]]:
    return [(m, i) for m, deps in g.items() for i in deps if LAYER[i.split(".")[0]] > LAYER[m.split(".")[0]]]


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for d in sorted(g[m]):
            if state.get(d) == 1:
                return path + [m, d]
            if d not in state and (cycle := visit(d, path + [m])):
                return cycle
        state[m] = 2
        return None
    for m in sorted(g):
        if m not in state and (cycle := visit(m, [])):
            return cycle
    return None


def test_no_import_runs_up_a_layer():
    assert upward_imports(graph()) == []


def test_no_import_cycle():
    assert find_cycle(graph()) is None


def test_the_checks_see_a_cycle_and_an_upward_import(tmp_path):
    for pkg, body in (("laten_ray", "from . import b\n"), ("jobs", "")):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "laten_ray" / "a.py").write_text("from . import b\n")
    (tmp_path / "laten_ray" / "b.py").write_text("def f():\n    from laten_ray.a import g\n    import jobs.c\n")
    (tmp_path / "jobs" / "c.py").write_text("")
    g = graph(tmp_path)
    assert upward_imports(g) == [("laten_ray.b", "jobs.c")]
    assert find_cycle(g) == ["laten_ray.a", "laten_ray.b", "laten_ray.a"]


def test_nothing_points_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, text=True).stdout.split()
    assert tracked, "git ls-files listed nothing"
    bad = [f for f in tracked if f.endswith((".py", ".md", ".yaml", ".toml", ".txt", ".json")) and
           (REPO / f).is_file() and
           any(s in (REPO / f).read_text(encoding="utf-8", errors="replace")
               for s in NEEDLES)]
    assert not bad, bad
