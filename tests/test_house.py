"""The house rules of scripts/, read from the files (fast: no import, no process).

- (a) the import graph of scripts/ has no circle (module-level and function-level
  imports alike);
- (b) no module imports from a layer above its own (LAYERS, one layer per package,
  bottom up as in the README's layout: formats, console < placement < engine < rank,
  model < pbs, reporting < pipeline, dataset < tools);
- (c) no module is over MAX_LINES lines;
- (d) only scripts/formats/ parses the files the parts share: json.load(s) elsewhere
  only in the modules of JSON_READERS, each for a file of its own;
- (e) a runnable module puts scripts/ on sys.path (its ``if __package__`` preamble)
  before it imports any of scripts/' packages;
- (f) a folder name or state word of a shared format is spelled by its owner only
  (OWNED_NAMES, OWNED_WORDS): the others take the owner's constant.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

# Layer of each package (a module of scripts/ outside a package counts as one).
LAYERS = {
    "formats": 1,
    "console": 1,  # a line on stderr, whole (scripts/console.py): used at every layer
    "placement": 2,
    "engine": 3,
    "rank": 4,
    "model": 4,
    "pbs": 5,
    "reporting": 5,
    "pipeline": 6,
    "dataset": 6,  # a dataset cut into ranks, merged, billed: over rank, pbs, reporting
    "tools": 7,  # developer tools, not runtime
}

# Upward imports that are known and not yet undone: (importer, imported) -> why. The
# test also fails when one of them is gone, so that the list only shrinks.
KNOWN_UPWARD: dict[tuple[str, str], str] = {}

MAX_LINES = 600
# Modules allowed over MAX_LINES, with the reason.
LONG_MODULES: dict[str, str] = {}

# Modules outside scripts/formats/ that parse JSON, and what they parse (none of it a
# rank record, an engine registry entry, a failure note, a model marker, partial
# answers or an engine spec: those go through scripts/formats/).
JSON_READERS = {
    "reporting.accounting": "logs/pbs/<job>.phases.json, written by itself (record_phases)",
    "reporting.progress": "its own memory between status rounds (load_memory)",
    "pbs.parse": "qstat -F json output",
    "pbs.submission": "the job script's Snakemake properties line",
    "pbs.commands": "the submitting child's answer on a pipe",
    "pbs.settings": "the provider's settings (AURORA_PBS_SETTINGS)",
    "pbs.state": "the submission state, status.json (only the provider reads it)",
    "pbs.node": "the nodes' shares, written by pbs-submit",
    "model.fetch": "the model's config.json and its own command-line arguments",
    "model.stage": "its probe's answer and its settings file",
    "engine.echo_server": "request bodies",
    "engine.client": "engine answers",
    "engine.vllm_versions": "the model's tokenizer_config.json",
    "rank.jsonl": "the lines of a .jsonl rank file (user input)",
    "rank.checks": "the task's --settings",
    "dataset.cut": "a dataset's lines (user input) and its own manifest, ranks.json",
    "dataset.merge": "the ranks' answer lines, written by rank/jsonl.py's answer_line",
    "dataset.tables": "a datasets folder's state.json and dataset_dict.json (user input)",
    "tools.build_model": "a model's config.json",
}


def modules() -> dict[str, Path]:
    """Dotted name (``engine.routing``; a package's ``__init__``: ``pbs``) -> file."""
    found = {}
    for path in sorted(SCRIPTS.rglob("*.py")):
        parts = path.relative_to(SCRIPTS).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            found[".".join(parts)] = path
    return found


MODULES = modules()
PACKAGES = {name.split(".")[0] for name in MODULES}


def _target(name: str) -> str | None:
    """The module of scripts/ that a dotted import name refers to (the longest known
    prefix), or None."""
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in MODULES:
            return candidate
    return None


def _run_time_nodes(tree: ast.AST):
    """Every node of ``tree`` but those under ``if TYPE_CHECKING:`` (never run)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            for other in node.orelse:
                yield other
                yield from _run_time_nodes(other)
            continue
        yield node
        yield from _run_time_nodes(node)


def imports(name: str, path: Path) -> set[str]:
    """The modules of scripts/ that module ``name`` imports, anywhere in its file."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in _run_time_nodes(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            # ``from pkg import mod`` imports the module; ``from mod import name``, mod.
            names = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                for alias in node.names
            ]
        for imported in names:
            target = _target(imported)
            if target is not None and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    return {name: imports(name, path) for name, path in MODULES.items()}


def layer(name: str) -> int:
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        key = ".".join(parts[:end])
        if key in LAYERS:
            return LAYERS[key]
    raise AssertionError(f"scripts/{name.replace('.', '/')}.py has no layer in LAYERS")


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of ``edges`` (strongly connected parts of more than one module,
    or a module importing itself)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            part = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                part.append(member)
                if member == node:
                    break
            if len(part) > 1 or node in edges.get(node, ()):
                found.append(sorted(part))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_the_imports():
    """The reader itself: relative, absolute and function-level imports are edges;
    imports for type checkers only are not."""
    edges = graph()
    assert "placement.tiles" not in edges["placement.ports"]  # under TYPE_CHECKING
    assert "pbs.continuation" in edges["pbs.status"]  # from .continuation import ...
    assert "formats.registry" in edges["engine.routing"]  # from formats import registry as
    assert "engine.watchdog" in edges["rank.task"]  # inside end_now
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle():
    assert circles(graph()) == []


def test_no_upward_import():
    upward = {
        (name, target)
        for name, targets in graph().items()
        for target in targets
        if layer(target) > layer(name)
    }
    assert sorted(upward - KNOWN_UPWARD.keys()) == [], "imports from a layer above"
    assert sorted(KNOWN_UPWARD.keys() - upward) == [], "undone: take them out of KNOWN_UPWARD"


def test_every_module_has_a_layer():
    for name in MODULES:
        layer(name)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_size(name):
    lines = len(MODULES[name].read_text().splitlines())
    if name in LONG_MODULES:
        assert lines > MAX_LINES, f"{name} is short now: take it out of LONG_MODULES"
    else:
        assert lines <= MAX_LINES, f"scripts/{name.replace('.', '/')}.py has {lines} lines"


def parses_json(path: Path) -> bool:
    """Whether the file calls json.load or json.loads (any spelling of the import)."""
    tree = ast.parse(path.read_text(), str(path))
    aliases = {"json"}
    loaders = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname or a.name for a in node.names if a.name == "json"}
        elif isinstance(node, ast.ImportFrom) and node.module == "json":
            loaders |= {a.asname or a.name for a in node.names if a.name in ("load", "loads")}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if (
                isinstance(func, ast.Attribute)
                and func.attr in ("load", "loads")
                and isinstance(func.value, ast.Name)
                and func.value.id in aliases
            ):
                return True
            if isinstance(func, ast.Name) and func.id in loaders:
                return True
    return False


def test_shared_files_are_parsed_in_formats_only():
    readers = {
        name
        for name, path in MODULES.items()
        if not name.startswith("formats") and parses_json(path)
    }
    assert sorted(readers - JSON_READERS.keys()) == [], (
        "parses JSON outside scripts/formats/: read shared files through their formats "
        "module, or add the module to JSON_READERS saying what it parses"
    )
    assert sorted(JSON_READERS.keys() - readers) == [], "no JSON any more: out of JSON_READERS"


def test_parses_json_sees_every_spelling(tmp_path):
    cases = {
        "import json\njson.loads('{}')\n": True,
        "import json as j\nj.load(open('x'))\n": True,
        "from json import loads\nloads('1')\n": True,
        "import json\njson.dumps({})\n": False,
    }
    for number, (text, expected) in enumerate(cases.items()):
        path = tmp_path / f"m{number}.py"
        path.write_text(text)
        assert parses_json(path) is expected, text


def preamble_problem(path: Path) -> str | None:
    """Why a runnable module imports a package of scripts/ before its preamble (None:
    it does not). Module-level statements only: they run at import, in order."""
    tree = ast.parse(path.read_text(), str(path))
    if not any(
        isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) for node in tree.body
    ):
        return None  # not runnable
    for node in tree.body:
        if isinstance(node, ast.If) and "__package__" in ast.unparse(node.test):
            return None
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            continue
        for imported in names:
            if imported.split(".")[0] in PACKAGES:
                return f"line {node.lineno}: imports {imported} before the preamble"
    return None


def test_runnable_modules_put_scripts_on_the_path_first():
    problems = {name: preamble_problem(path) for name, path in MODULES.items()}
    assert {name: why for name, why in problems.items() if why} == {}


def test_preamble_check_sees_a_late_preamble(tmp_path):
    late = tmp_path / "late.py"
    late.write_text(
        "import sys\nfrom formats import files\n"
        "if __package__ in (None, ''):\n    sys.path[0] = '.'\n"
        "if __name__ == '__main__':\n    pass\n"
    )
    assert preamble_problem(late) == "line 2: imports formats before the preamble"


# The folder and file names of the shared formats, and the registry's state words: each
# spelled (as a string of code; docstrings and comments aside) by its owner only, the
# module that writes and reads it. Others take its constant or function.
OWNED_NAMES = {  # spelled anywhere in a string
    "logs/engines": "formats.registry",
    "logs/infer/failed": "formats.failure_note",
    "/records": "formats.record",
    "records/": "formats.record",
    ".engines.json": "formats.engine_spec",
    ".failed.json": "formats.preflight_failure",
}
OWNED_WORDS = {  # a whole string
    "records": "formats.record",
    "starting": "formats.registry",
    "ready": "formats.registry",
    "restarting": "formats.registry",
    "stopped": "formats.registry",
    "failed": "formats.registry",
}
# Modules that spell a word for a thing of their own, not the owner's: (module, word) -> why.
OWN_MEANINGS = {
    ("pbs.parse", "failed"): "a PBS job's end (pbs.parse.FAILED, the submission state)",
    ("model.stage", "failed"): "a node's preflight note, a file of model/stage.py's own",
}
WORKFLOW_FILES = [SCRIPTS.parent / "Snakefile", *sorted((SCRIPTS.parent / "rules").glob("*.smk"))]


def code_strings(path: Path) -> list[str]:
    """The strings of a module's code (f-strings' literal parts too), docstrings aside."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
    ]


def workflow_strings(path: Path) -> list[str]:
    """The quoted strings of a Snakemake file, comments aside."""
    lines = [line.split("#", 1)[0] for line in path.read_text().splitlines()]
    return re.findall(r"\"([^\"\n]*)\"|'([^'\n]*)'", "\n".join(lines))


def misspelt(name: str, strings: list[str]) -> list[str]:
    """The owned names and words that ``name`` (a module, or a workflow file) spells but
    does not own."""
    found = set()
    for text in strings:
        found |= {n for n, owner in OWNED_NAMES.items() if n in text and owner != name}
        owner = OWNED_WORDS.get(text)
        if owner is not None and owner != name and (name, text) not in OWN_MEANINGS:
            found.add(text)
    return sorted(found)


def test_each_folder_name_and_state_word_is_spelled_by_its_owner_only():
    problems = {name: misspelt(name, code_strings(path)) for name, path in MODULES.items()}
    for path in WORKFLOW_FILES:
        strings = ["".join(pair) for pair in workflow_strings(path)]
        problems[path.name] = misspelt(path.name, strings)
    assert {name: words for name, words in problems.items() if words} == {}


def test_owned_names_are_found_in_code_and_not_in_docstrings(tmp_path):
    module = tmp_path / "m.py"
    module.write_text(
        '"""Writes logs/engines/."""\n\n\ndef f():\n    """ready"""\n'
        '    return f"{x}/records/{y}", "ready", "logs/infer/failed"\n'
    )
    assert misspelt("m", code_strings(module)) == [
        "/records",
        "logs/infer/failed",
        "ready",
        "records/",
    ]
    assert misspelt("formats.registry", ["ready", "logs/engines"]) == []
