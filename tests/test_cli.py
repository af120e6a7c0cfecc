"""The ``hybridgl`` command's error routing, and the import graph it sits on.

User errors print one line (exit 2); anything else is a bug and keeps its traceback (exit 1). The
modules of backend/ and worker/ import each other without a circle (imports inside functions count).
"""

from __future__ import annotations

import ast
from pathlib import Path

from worker.cli import build_parser, main, run_command

REPO = Path(__file__).resolve().parents[1]


def test_user_errors_print_their_message_alone(tmp_path, capsys):
    # A missing image (the method's InputError), and a command used without its mode (evaluate's own error).
    assert main(["segment", str(tmp_path / "missing.jpg"), "the dog", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "hybridgl segment: error: image file" in err and "does not exist" in err
    assert "Traceback" not in err
    assert main(["evaluate"]) == 2
    err = capsys.readouterr().err
    assert "hybridgl evaluate: error: give --dataset" in err and "Traceback" not in err


def test_a_setting_with_a_bad_value_is_a_user_error(capsys, monkeypatch):
    monkeypatch.setenv("HYBRIDGL_ALPHA", "a lot")
    assert main(["segment", "x.jpg", "the dog", "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert "HYBRIDGL_ALPHA='a lot' is not a valid float" in err and "Traceback" not in err


def test_any_other_exception_keeps_its_traceback_and_says_it_is_a_bug(capsys):
    """The command function is replaced by one that fails the way a bug does (a plain ValueError from
    ``int``): plain ValueErrors used to be shown as one-line user errors, hiding the traceback."""
    args = build_parser().parse_args(["evaluate"])
    args.func = lambda _: int("not a number")
    assert run_command(args) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "invalid literal for int()" in err
    assert "hybridgl evaluate: unexpected ValueError: this is a bug; please report it" in err


def _imports(path: Path, modules: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                package = _module_name(path).rsplit(".", node.level - (path.name == "__init__.py"))[0]
                base = f"{package}.{node.module}" if node.module else package
            else:
                base = node.module
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules}
    return found


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_circle():
    files = [p for top in ("backend", "worker") for p in (REPO / top).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    graph = {name: _imports(path, set(modules)) - {name} for name, path in modules.items()}
    # A module importing its own package's __init__ is Python's normal order, not a circle.
    graph = {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in graph.items()}
    state: dict[str, str] = {}
    circles: list[list[str]] = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                circles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not circles, f"import circles: {circles}"
    assert "worker.cli" not in graph["worker.evaluate.benchmark"]
