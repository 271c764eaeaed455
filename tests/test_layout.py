"""The house's rules (DEVELOPERS.md), read off the source: who may import whom, and how long the reading path is."""

import ast
from pathlib import Path

from conftest import ROOT

SCRIPTS = ("train_sft", "train_rm", "train_ppo")
READER_PATH = [f"{s}.py" for s in SCRIPTS] + [f"nanorlhf/{m}.py" for m in
                                              ("model", "rollout", "sft", "reward", "ppo", "ops")]


def sources(folder):
    return sorted((ROOT / folder).glob("*.py"))


def imported(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function: 'nanorlhf.model', 'train_sft', ..."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}  # `from nanorlhf import ops` imports ops
    return names


def package_graph() -> dict[str, set[str]]:
    """nanorlhf module -> the nanorlhf modules it imports."""
    modules = {f"nanorlhf.{p.stem}" for p in sources("nanorlhf")}
    return {f"nanorlhf.{p.stem}": (imported(p) & modules) - {f"nanorlhf.{p.stem}"} for p in sources("nanorlhf")}


def find_cycle(graph):
    """A list of modules that import each other in a circle, or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_the_checks_see_a_circle_and_a_script_import():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    probe = ROOT / "tests" / "__layout_probe.py"
    try:
        probe.write_text("def f():\n    from train_sft import main\nfrom nanorlhf import ops, model\n")
        assert {"train_sft", "nanorlhf.ops", "nanorlhf.model"} <= imported(probe)
    finally:
        probe.unlink()


def test_the_package_has_no_import_circle():
    assert find_cycle(package_graph()) is None, f"import circle: {' -> '.join(find_cycle(package_graph()))}"


def test_no_script_is_imported_by_code_or_tests():
    files = [ROOT / f"{s}.py" for s in SCRIPTS] + sources("nanorlhf") + sources("kernels") + sources("bench")
    files += sources("tests")
    for path in files:
        bad = {n for n in imported(path) if n.split(".")[0] in SCRIPTS}
        assert not bad, f"{path.relative_to(ROOT)} imports the script(s) {sorted(bad)}"


def test_no_test_imports_another_test():
    for path in sources("tests"):
        bad = {n for n in imported(path) if n.split(".")[0].startswith("test_")}
        assert not bad, f"{path.relative_to(ROOT)} imports the test module(s) {sorted(bad)}: use tests/conftest.py"


def test_kernels_stand_on_their_own():
    for path in sources("kernels"):
        bad = {n for n in imported(path) if n.split(".")[0] in ("nanorlhf", "bench")}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}: kernel files import nothing of nanorlhf"


def test_the_model_imports_only_the_seams_and_the_tokenizer():
    ours = {n for n in imported(ROOT / "nanorlhf" / "model.py") if n.startswith("nanorlhf")}
    assert ours <= {"nanorlhf", "nanorlhf.ops", "nanorlhf.tokenizer", "nanorlhf.tokenizer.PAD",
                    "nanorlhf.tokenizer.EOT"}, ours


def test_the_reading_path_fits_an_evening():
    lines = {p: len((ROOT / p).read_text().splitlines()) for p in READER_PATH}
    assert sum(lines.values()) <= 2000, lines
    for path in sources("kernels"):
        assert len(path.read_text().splitlines()) <= 1000, f"{path.name} is over 1,000 lines"
