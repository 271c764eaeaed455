"""The house's rules (DEVELOPERS.md), read off the source: who may import whom, and how long the reading path is."""

import ast
from pathlib import Path

from conftest import ROOT

SCRIPTS = tuple(sorted(p.stem for p in ROOT.glob("train_*.py")))  # the stages, and DPO beside them
READER_PATH = [f"{s}.py" for s in ("train_sft", "train_rm", "train_ppo")] + [
    f"nanorlhf/{m}.py" for m in ("model", "rollout", "sft", "reward", "ppo", "ops")]


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


def readme_tree() -> dict[str, str]:
    """README's layout block as {path: its comment}; a line under a folder ("nanorlhf/") names files in it, and one
    line may name several files ("a.md, b.md   comment")."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Layout", 1)[1].split("```")[1]
    tree, folder = {}, ""
    for line in block.splitlines():
        if not line.strip():
            continue
        indented = line.startswith(" ")
        names, _, comment = line.strip().partition("  ")
        if not indented:
            folder = ""
        if names.endswith("/") and not comment.strip():
            folder = names
            continue
        for name in names.split(", "):
            tree[(folder if indented else "") + name.strip()] = comment.strip()
    return tree


def test_readme_fits_two_screens_and_its_tree_names_every_file():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150
    tree = readme_tree()
    files = [p.relative_to(ROOT).as_posix() for folder in ("nanorlhf", "kernels", "bench") for p in sources(folder)]
    files += [f"{s}.py" for s in SCRIPTS] + ["README.md", "DEVELOPERS.md", "Makefile", "pyproject.toml", ".ci/run"]
    files += [p.relative_to(ROOT).as_posix() for folder in ("docs", "results") for p in (ROOT / folder).iterdir()]
    for f in files:
        assert f in tree, f"README's layout does not list {f}"
        assert tree[f], f"README's layout lists {f} without a comment"
    for f in tree:
        assert (ROOT / f).exists(), f"README's layout lists {f}, which does not exist"
