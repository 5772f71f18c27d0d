"""The package's data flows one way: integrations (other libraries' hooks) and the
command-line tools -> front ends -> run -> dispatch -> backends -> cuda, over the core modules that describe a call (params, checks,
dropout, paged: the paged KV cache's host side) and the bounded cache they share (recent). No module imports one of a layer above it."""
from __future__ import annotations

import ast
from pathlib import Path

import varattn

PACKAGE = Path(varattn.__file__).parent
# Higher imports lower; a layer's own modules import each other.
LAYERS = {"cli": 6, "integrations": 6, "frontends": 5, "run": 4, "dispatch": 3, "backends": 2, "cuda": 1, "core": 0}
CORE = ("params", "checks", "dropout", "recent", "paged")


def layer_of(module: str) -> str:
    """'varattn.frontends.nested' -> 'frontends', 'varattn.params' -> 'core'."""
    top = module.split(".")[1]
    return "core" if top in CORE else top


def imports_of(path: Path) -> set[str]:
    """The varattn modules `path` imports."""
    parts = ["varattn", *path.relative_to(PACKAGE).with_suffix("").parts]
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - node.level + 1]
            target = [*base, *(node.module.split(".") if node.module else [])]
            if node.module is None or len(target) == 1:  # from . import a, b: each is a module
                found |= {".".join([*target, alias.name]) for alias in node.names}
            else:
                found.add(".".join(target))
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("varattn.")}
    return {m for m in found if m.startswith("varattn.") and len(m.split(".")) > 1}


def test_no_module_imports_a_layer_above_it():
    checked, upward = 0, []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(["varattn", *path.relative_to(PACKAGE).with_suffix("").parts])
        if module in ("varattn.__init__", "varattn.__main__"):  # the public surface sits on top
            continue
        mine = layer_of(module)
        assert mine in LAYERS, f"{module}: add its layer to LAYERS"
        for target in imports_of(path):
            theirs = layer_of(target)
            assert theirs in LAYERS, f"{module} imports {target}, of no known layer"
            if theirs != mine and LAYERS[theirs] >= LAYERS[mine]:
                upward.append(f"{module} imports {target}")
            checked += 1
    assert checked > 20 and not upward, upward
