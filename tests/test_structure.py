"""The code's shape: data flows one way (no import cycles, nothing imports an entry point, the stages
of the search import downward only, the trial side never imports the search side, the data ingest
imports none of the trial's code, the ground floor `core` imports nothing but the standard library),
the commands alone at the top of `search/`, every module has a file name of its own, functions and
modules stay short, and predict needs no Ray."""
import ast
import subprocess
import sys
from dataclasses import fields

import pytest

from conftest import ROOT

PACKAGES = ("core", "spaces", "ingest", "trainables", "search")
ENTRY_POINTS = {"search.run", "search.finalize", "search.predict", "search.audit"}
# the top of search/: the commands, what they share (flags and the error handler; the options as plain data)
TOP_OF_SEARCH = ENTRY_POINTS | {"search", "search.cli", "search.options"}
# the search's stages, each a subpackage, lowest first: each may import those before it, none after
STAGES = ("search.outputs", "search.data", "search.engine", "search.final")
COMMAND_SIDE = tuple(sorted(TOP_OF_SEARCH - {"search", "search.options"}))
# a module of the first package may import none of the second's
FORBIDDEN = {"core": ("spaces", "ingest", "trainables", "search"), "spaces": ("ingest", "trainables", "search"),
             "ingest": ("trainables", "search", "spaces"), "trainables": ("search", "spaces"),
             **{stage: STAGES[i + 1:] + COMMAND_SIDE for i, stage in enumerate(STAGES)}}
MAX_FUNCTION_LINES, MAX_MODULE_LINES = 80, 400


def _modules() -> dict:
    files = [f for package in PACKAGES for f in sorted((ROOT / package).rglob("*.py"))]
    return {".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): f for f in files}


def import_graph(modules: dict) -> dict[str, set[str]]:
    """Module -> the project modules it imports, anywhere in its body (imports inside functions too)."""
    graph = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
                found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def test_the_import_graph_check_finds_what_it_looks_for():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    graph = import_graph(_modules())
    assert "trainables.train" in graph["trainables.trainable"]  # a real edge is seen
    assert "search.engine.experiment" in graph["search.run"]


def test_no_import_cycles():
    assert cycles(import_graph(_modules())) == []


def test_no_module_imports_an_entry_point():
    graph = import_graph(_modules())
    bad = [f"{a} imports {b}" for a, deps in sorted(graph.items()) for b in sorted(deps & ENTRY_POINTS)]
    assert bad == []


def _package(module: str) -> str:
    """The package a module belongs to for the import rules: a stage of the search, or a top-level package."""
    return next((stage for stage in STAGES if module == stage or module.startswith(stage + ".")), module.split(".")[0])


def test_imports_go_one_way_between_packages():
    graph = import_graph(_modules())
    bad = [f"{a} imports {b}" for a, deps in sorted(graph.items()) for b in sorted(deps)
           if _package(a) in FORBIDDEN and _package(b) != _package(a)
           and any(b.startswith(p) if p.endswith(".") else b == p or b.startswith(p + ".")
                   for p in FORBIDDEN[_package(a)])]
    assert bad == []
    assert "ingest.dataset" in graph["trainables.train"]  # the trial reads the ingest's Dataset
    assert "core.errors" in graph["ingest.dataset"]       # and everything stands on the ground floor
    assert "search.engine.checkpoints" in graph["search.final.retrain"]  # a later stage reads an earlier one's


def test_the_commands_are_alone_at_the_top_of_search():
    top = {name for name in _modules() if name.startswith("search") and name.count(".") <= 1 and name not in STAGES}
    assert top == TOP_OF_SEARCH
    inside = [name for name in _modules() if name.startswith("search.") and name not in TOP_OF_SEARCH | set(STAGES)]
    assert inside and all(_package(name) in STAGES for name in inside)


def test_the_ground_floor_imports_the_standard_library_only():
    """`core` is what reading options or raising an error costs: no torch, Ray or matplotlib."""
    heavy = []
    for name, path in _modules().items():
        if name.split(".")[0] == "core":
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and not node.level else []
                heavy += [f"{name} imports {m}" for m in names
                          if m.split(".")[0] not in sys.stdlib_module_names and m.split(".")[0] != "core"]
    assert heavy == []
    # the options and their checks stand on it alone: reading a flag's allowed values starts no library
    heavy = "{'torch', 'ray', 'numpy', 'matplotlib', 'timm', 'optuna', 'sklearn', 'pandas', 'PIL'}"
    code = f"import sys, core.errors, core.formatting, search.options; print(sorted({heavy} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True).stdout.strip() == "[]"


def test_each_allowed_value_is_written_once_and_its_builders_agree():
    from core import choices
    from search.options import SearchOptions
    from search.engine.samplers import SAMPLERS
    from trainables.config import CHOICES
    assert tuple(SAMPLERS) == choices.SAMPLER_NAMES
    assert (CHOICES["weights"], CHOICES["precision"], CHOICES["memory_format"]) == \
        (choices.WEIGHTS, choices.PRECISIONS, choices.MEMORY_FORMATS)
    allowed = {f.name: f.metadata.get("choices") for f in fields(SearchOptions)}
    assert allowed["sampler"] == choices.SAMPLER_NAMES and allowed["weights"] == choices.WEIGHTS
    assert allowed["metric"] == tuple(choices.METRIC_MODES) and allowed["precision"] == choices.PRECISIONS


def test_no_two_modules_share_a_file_name():
    """Across the library and the benchmarks: `bench/stop_rule.py` beside `search/engine/stop_rule.py` sent
    readers (and tracebacks) to the wrong file."""
    names = {}
    for name, path in _with_bench().items():
        if path.name != "__init__.py":
            names.setdefault(path.name, []).append(name)
    assert {file: found for file, found in names.items() if len(found) > 1} == {}


def _with_bench() -> dict:
    return {**_modules(), **{f"bench.{f.stem}": f for f in sorted((ROOT / "bench").glob("*.py"))}}


def test_functions_and_modules_stay_short():
    long = []
    for name, path in _with_bench().items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long.append(f"module {name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert long == []


@pytest.mark.parametrize("module", ["search.predict", "search.final.saved_model"])
def test_predict_imports_without_ray(module):
    code = f"import sys; sys.modules['ray'] = None; import {module}"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary_one(tmp_path):
    from search.outputs.records import write_atomic
    path = tmp_path / "leaderboard.csv"
    path.write_text("old\n")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError):
        write_atomic(path, half_then_fail)
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["leaderboard.csv"]


def test_the_readme_is_a_front_page_that_links_every_manual_page_and_no_link_is_broken():
    import re
    readme = (ROOT / "README.md").read_text()
    assert len(readme) <= 15_000, len(readme)
    pages = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))
    assert pages and all(f"]({page})" in readme for page in pages), pages
    for document in [ROOT / "README.md", ROOT / "BENCHMARKS.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)\s]+)\)", document.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            linked = (document.parent / path).resolve() if path else document
            assert linked.exists(), f"{document.name}: {target}"
            if anchor and linked.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", linked.read_text(), re.MULTILINE)
                slugs = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}
                assert anchor in slugs, f"{document.name}: {target}"


def test_every_command_has_a_console_script_installed():
    """pyproject's [project.scripts] names each entry point's main once, and the install put them
    beside this Python (after a change here, `pip install -e .` again)."""
    import importlib
    import re
    from pathlib import Path
    table = (ROOT / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n[")[0]
    scripts = dict(re.findall(r'^([\w-]+) = "([\w.]+):main"$', table, re.MULTILINE))
    assert sorted(scripts.values()) == sorted(ENTRY_POINTS), scripts
    assert all(callable(importlib.import_module(module).main) for module in scripts.values())
    missing = [name for name in scripts if not (Path(sys.executable).parent / name).is_file()]
    assert not missing, f"not installed: {missing}"


def _private_uses(path) -> list[str]:
    """Attributes whose name starts with one underscore, read or set on anything but the module's own
    objects (an attribute its class's `__init__` sets, or a method it defines), and imports of a private
    module of Ray or Optuna."""
    tree, own, found = ast.parse(path.read_text()), set(), []
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        for item in cls.body:
            if isinstance(item, ast.FunctionDef):
                own.add(item.name)
                if item.name == "__init__":
                    own |= {n.attr for n in ast.walk(item) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)
                            and isinstance(n.value, ast.Name) and n.value.id == "self"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            mine = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls") and node.attr in own
            found += [] if mine else [f"{path.name}:{node.lineno} .{node.attr}"]
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{path.name}:{node.lineno} import {m}" for m in names
                      if m.split(".")[0] in ("ray", "optuna") and any(p.startswith("_") for p in m.split("."))]
    return found


def test_every_private_attribute_of_ray_or_optuna_is_reached_through_one_module():
    door = ROOT / "search" / "engine" / "ray_internals.py"
    assert _private_uses(door)  # the check sees what it looks for
    elsewhere = [use for name, path in _modules().items() if path != door for use in _private_uses(path)]
    assert elsewhere == []


def _messages(path) -> list[str]:
    """The string literals of a module that are not docstrings (f-strings' constant parts included)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docstrings]


def test_the_ingest_words_its_messages_in_the_datas_terms_and_the_command_line_adds_flags():
    import re
    flag = re.compile(r"(?<![\w-])--[a-z][a-z-]+")
    assert flag.search("pass --data-cache") and not flag.search("a-b --")  # the check sees what it looks for
    named = [f"{path.relative_to(ROOT)}: {text!r}" for name, path in _modules().items()
             if name.startswith("ingest") or name == "trainables.models"
             for text in _messages(path) if flag.search(text)]
    assert named == []
