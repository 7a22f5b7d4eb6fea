"""The package's layout says what it is (issue 20): one folder per concern, each saying what it is for, the top level
left with the entry points and options, and no module depending, however indirectly, on one that depends on it."""
import ast
from pathlib import Path

from conftest import PLUGIN_DIR

PACKAGE = Path(PLUGIN_DIR)


def _modules():
    """{dotted name: path} of every module of the package."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path, modules):
    """The package's modules that ``path`` imports, at the top or inside a function."""
    deps = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("b2t_fairseq"):
            deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names}  # fmt: skip
        elif isinstance(node, ast.Import):
            deps |= {a.name for a in node.names if a.name.startswith("b2t_fairseq")}
    return {d for d in deps if d in modules}


def test_every_folder_says_what_it_is_for_and_the_top_level_holds_only_the_entry_points():
    folders = sorted(p for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert {p.name for p in folders} >= {"modules", "models", "fast_paths", "safety", "compat", "recipes", "tools",
                                          "analysis", "toy"}  # fmt: skip
    for folder in folders:
        init = folder / "__init__.py"
        assert init.is_file(), f"{folder} is not a package"
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc and "\n" not in doc.strip(), f"{init}: one line saying what the folder is for"
    assert sorted(p.name for p in PACKAGE.glob("*.py")) == ["__init__.py", "options.py"]


def test_no_import_cycle_in_the_package():
    """Imports inside functions count: a cycle through a lazy import is still a circle to whoever reads it (the
    recipes had one: common -> hydra_configs -> every recipe -> common)."""
    modules = _modules()
    graph = {name: _imports(path, modules) - {name, "b2t_fairseq"} for name, path in modules.items()}
    state = {}  # name -> "open" while on the path, "done" once all it reaches is known to be acyclic

    def visit(name, path):
        state[name] = "open"
        for dep in sorted(graph[name]):
            assert state.get(dep) != "open", "import cycle: " + " -> ".join(path[path.index(dep):] + [dep])
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_one_module_lists_the_recipes():
    modules = _modules()
    recipes = {"b2t_fairseq.recipes." + n for n in ("wmt_en_de", "gigaword", "wikitext103", "librispeech")}
    importers = {name for name, path in modules.items() if _imports(path, modules) & recipes}
    assert importers == {"b2t_fairseq.recipes.catalog"}, importers
    from b2t_fairseq.recipes.catalog import RECIPES

    assert sorted(RECIPES) == sorted(n.rsplit(".", 1)[1] for n in recipes)


def test_every_entry_point_the_docs_name_exists():
    """Each console script resolves to a function, and each ``python -m b2t_fairseq...`` that the README, the
    scripts' READMEs, the shell wrappers or a module's own usage names is a module that runs when so started."""
    import importlib
    import re
    from importlib import metadata

    scripts = [ep for ep in metadata.distribution("b2t_fairseq").entry_points if ep.group == "console_scripts"]
    assert len(scripts) >= 6
    for ep in scripts:
        assert callable(ep.load()), ep
    repo = PACKAGE.parent
    texts = [repo / "README.md", *repo.glob("scripts/*/*"), *PACKAGE.rglob("*.py")]
    pattern = re.compile(r"python3? -m (b2t_fairseq(?:\.\w+)+)(?![\w.])")  # not "b2t_fairseq.recipes.<recipe>"
    named = {m for path in texts if path.is_file() for m in pattern.findall(path.read_text(encoding="utf-8"))}
    assert "b2t_fairseq.recipes.catalog" in named and "b2t_fairseq.toy.speech" in named
    for name in sorted(named):
        source = Path(importlib.util.find_spec(name).origin).read_text(encoding="utf-8")
        assert 'if __name__ == "__main__":' in source, f"python -m {name} would do nothing"
