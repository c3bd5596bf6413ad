"""The package's structure holds: import layers point one way (import-linter's contracts in
pyproject.toml), no module reaches into another's private names, function-local imports
are only for optional heavy dependencies and say why, and a plain ``import sparseforge``
loads none of Triton, sympy, networkx or matplotlib. Each checker is also run on a small
bad example, so it is shown to fail when it should."""

import ast
import pathlib
import shutil
import subprocess
import sys

import tomllib

import sparseforge

PACKAGE = pathlib.Path(sparseforge.__file__).parent
ROOT = PACKAGE.parent
#: third-party modules a function may import locally (optional or only sometimes needed)
OPTIONAL = ("matplotlib", "transformers", "natten", "torch.nn.attention.flex_attention")


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        yield name.removesuffix(".__init__"), path


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    """The absolute module an ``ImportFrom`` names."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def private_imports(module: str, source: str, is_package: bool = False) -> list[str]:
    """``from sparseforge.x import _name`` of another module, and ``x._name`` on an imported
    sparseforge module: the places one module uses another's private names."""
    tree = ast.parse(source)
    found, aliases = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _absolute(module, node, is_package)
            if not target.startswith("sparseforge"):
                continue
            for a in node.names:
                submodule = f"{target}.{a.name}"
                if a.name.startswith("_") and not a.name.startswith("__") and submodule != module:
                    found.append(f"{module}: from {target} import {a.name}")
                aliases.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            aliases.update(a.asname or a.name.split(".")[0] for a in node.names
                           if a.name.startswith("sparseforge"))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            found.append(f"{module}: {node.value.id}.{node.attr}")
    return found


def local_imports(module: str, source: str) -> list[str]:
    """Imports inside functions that are not an optional dependency with a reason."""
    lines = source.splitlines()
    found = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        imports = []
        for node in ast.walk(fn):
            if isinstance(node, ast.Import):
                imports.append((node.lineno, [a.name for a in node.names]))
            elif isinstance(node, ast.ImportFrom):
                imports.append((node.lineno, ["." * node.level + (node.module or "")]))
        # one reason per function: a comment on (or just above) one of its local imports
        said = any("#" in lines[n - 1] or lines[n - 2].strip().startswith("#") for n, _ in imports)
        for lineno, names in imports:
            if not (all(n.startswith(OPTIONAL) for n in names) and said):
                found.append(f"{module}:{lineno}: {', '.join(names)}")
    return found


def test_import_linter_contracts_hold():
    beside = pathlib.Path(sys.executable).with_name("lint-imports")  # this interpreter's own
    lint = str(beside) if beside.exists() else shutil.which("lint-imports")
    assert lint, "import-linter is part of the test extra: pip install -e '.[test]'"
    proc = subprocess.run([lint], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "broken" in proc.stdout and "0 broken" in proc.stdout


def test_every_subpackage_and_module_is_in_a_layer():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in config["contracts"] if c["type"] == "layers")["layers"]
    named = {m.strip() for layer in layers for m in layer.split("|")}
    top = {".".join(("sparseforge", p.stem if p.is_file() else p.name))
           for p in PACKAGE.iterdir() if (p.suffix == ".py" and p.stem != "__init__")
           or (p.is_dir() and (p / "__init__.py").exists())}
    assert top <= named, f"not in any layer: {sorted(top - named)}"


def test_no_module_uses_another_modules_private_names():
    found = [f for name, path in _modules()
             for f in private_imports(name, path.read_text(), path.name == "__init__.py")]
    assert found == []


def test_the_private_import_check_catches_them():
    assert private_imports("sparseforge.runtime.x", "from ..planner.plan import _head_groups\n")
    assert private_imports("sparseforge.x", "from sparseforge.codegen import render\n"
                                            "render._environment()\n")
    assert private_imports("sparseforge.x", "from .y import public, __version__\n") == []


def test_function_local_imports_are_optional_dependencies_with_a_reason():
    found = [f for name, path in _modules() for f in local_imports(name, path.read_text())]
    assert found == []


def test_the_local_import_check_catches_them():
    assert local_imports("m", "def f():\n    from .planner import plan\n")
    assert local_imports("m", "def f():\n    import matplotlib\n")  # no reason given
    assert local_imports("m", "def f():\n    import matplotlib  # pictures only\n") == []


def test_a_plain_import_loads_no_heavy_dependency():
    heavy = ("triton", "sympy", "networkx", "matplotlib")
    code = ("import sys, sparseforge as sf; p = sf.sliding_window(64) | sf.sinks(4); "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env={"PATH": "", "TRITON_INTERPRET": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_public_api_is_unchanged():
    assert set(sparseforge.__all__) == set(sparseforge._PUBLIC)
    assert set(sparseforge.__all__) == {
        "BuildSpec", "Pattern", "Plan", "SparseAttention", "affine", "alibi", "alibi_slopes",
        "attention", "causal", "chunks", "clusters", "create_block_mask", "dense_mask",
        "documents", "flex_attention", "from_mask_mod", "from_score_mod", "full",
        "global_queries", "halo_blocks", "hierarchical", "load_kernels", "mask_table",
        "maxvit_block", "maxvit_grid", "merge",
        "na1d", "na2d", "na3d", "neighborhood", "per_head", "plan", "prefix_lm",
        "reference_attention", "pair_bias", "rel_bias", "sinks", "sliding_window", "softcap", "swin_window",
        "threshold_blocks", "top_left", "topk_blocks", "topk_chunks", "topk_keys",
        "vertical_slash", "window"}
    for name in sparseforge.__all__:
        assert getattr(sparseforge, name) is not None


def test_no_public_name_is_also_a_submodule():
    """Importing a submodule sets it as an attribute of the package: a public name equal
    to a module's (``sf.merge`` beside ``sparseforge/merge.py``) would turn into that
    module once something imports it."""
    modules = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
               if p.suffix == ".py" or (p / "__init__.py").exists()}
    assert modules.isdisjoint(sparseforge.__all__), modules & set(sparseforge.__all__)
