"""The house rules, checked on the real source: layered imports (import-linter's contracts in .importlinter), no import
cycles, registrations (tasks/) used only from the command line, function-level imports only for optional heavy
dependencies with a reason, and code and docs that describe the project as it is (no narration of its history)."""
import ast
import os
import pathlib
import re
import subprocess
import sys

import grimp

REPO = pathlib.Path(__file__).resolve().parents[1]
LAZY_ALLOWED = {"torch", "transformers", "tensorflow", "tensorflow_datasets", "tokenizers", "libtpu", "lm_eval",
                "apache_beam", "grain", "array_record", "qwix", "matplotlib", "pyarrow", "datasets", "rouge_score", "sacrebleu"}


def _sources():
    return sorted(list((REPO / "flan_jax").rglob("*.py")) + list((REPO / "tasks").rglob("*.py")))


def test_import_linter_contracts_hold():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                             "sys.exit(lint_imports_command())"], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def _strongly_connected(graph: dict) -> list:
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            out.append(component)

    sys.setrecursionlimit(10_000)
    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def _module_graph() -> dict:
    graph = grimp.build_graph("flan_jax")
    # A package's __init__ importing its own submodules is how Python packages work, not a cycle between modules.
    return {m: {d for d in graph.find_modules_directly_imported_by(m) if not m.startswith(d + ".")}
            for m in graph.modules}


def test_no_import_cycles():
    cycles = [sorted(c) for c in _strongly_connected(_module_graph()) if len(c) > 1]
    assert cycles == []


def test_the_cycle_finder_finds_a_cycle():
    assert [sorted(c) for c in _strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
            if len(c) > 1] == [["a", "b", "c"]]


def _imports(path: pathlib.Path):
    tree = ast.parse(path.read_text())
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    inner = {id(s) for f in functions for s in ast.walk(f)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name, id(node) in inner
        elif isinstance(node, ast.ImportFrom) and not node.level:
            yield node, node.module, id(node) in inner


def test_registrations_are_imported_only_by_the_command_line():
    """Library code asks the registry (e.g. registry.collection_registration('niv2')), never a task module."""
    offenders = []
    for path in (REPO / "flan_jax").rglob("*.py"):
        rel = path.relative_to(REPO).as_posix()
        for node, module, _ in _imports(path):
            if module and (module == "tasks" or module.startswith(("tasks.", "flan_jax.tasks"))) \
                    and not rel.startswith("flan_jax/cli/"):
                offenders.append(f"{rel}:{node.lineno} {module}")
    for path in (REPO / "tasks").rglob("*.py"):
        for node, module, _ in _imports(path):
            if module and module.startswith("flan_jax.") and not module.startswith(
                    ("flan_jax.data", "flan_jax.utils", "flan_jax.tasks")):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {module} (tasks/ may use data/ and utils/)")
    assert offenders == []


def test_function_level_imports_are_optional_heavy_dependencies_with_a_reason():
    offenders = []
    for path in _sources():
        lines = path.read_text().splitlines()
        for node, module, in_function in _imports(path):
            if not in_function:
                continue
            reason = "# lazy:" in lines[node.lineno - 1]
            if module.split(".")[0] not in LAZY_ALLOWED or not reason:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {module}")
    assert offenders == []


NARRATION = re.compile(r"\b(first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth|"
                       r"previous|last|this|next) (session|round)\b|\bbefore this round\b|\bsession \d+\b",
                       re.IGNORECASE)


def test_code_and_docs_describe_the_project_not_its_history():
    files = [p for p in _sources()] + list((REPO / "docs").rglob("*.md")) + [REPO / "README.md"]
    files += list((REPO / "scripts").rglob("*.py")) + list((REPO / "scripts").rglob("*.sh"))
    files += list((REPO / "gin_configs").rglob("*.gin"))
    found = [f"{p.relative_to(REPO)}:{i}: {line.strip()[:100]}" for p in files
             for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if NARRATION.search(line)]
    assert found == []


def test_the_narration_pattern_catches_a_diary_heading():
    assert NARRATION.search("## Tenth session: the decoder case")
    assert NARRATION.search("Before this round the figures were")
    assert not NARRATION.search("a training session's metrics")
