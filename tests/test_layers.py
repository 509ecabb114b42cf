"""The package's layers: imports only point down (issue 14), and DP training never needs CrypTen.

The layer of a module is that of the longest matching prefix in ``LAYERS``. An import of a
module in a higher layer, or in a different room of the same layer (``compiler`` and
``training`` know nothing of each other), fails the test; so does a function-local import of
a project module without a comment on its line saying why it is local.
"""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# package folder -> dotted prefix (protocols/ and training/ install inside cipherdm_torch)
SOURCES = {"cipherdm_torch": "cipherdm_torch", "protocols": "cipherdm_torch.protocols",
           "training": "cipherdm_torch.training"}
# room -> layer (1 = top). A module may import its own room and any room of a lower layer.
LAYERS = {
    "cipherdm_torch.cli": 1,
    "cipherdm_torch.pipelines": 2, "cipherdm_torch.evaluation": 2,
    "cipherdm_torch.compiler": 3, "cipherdm_torch.training": 3,
    "cipherdm_torch.protocols": 4, "cipherdm_torch.diffusion": 4,
    "cipherdm_torch.mpc": 5, "cipherdm_torch.data": 5,
    # the ground's own ground: one atomic-write helper, then the error types every layer raises
    "cipherdm_torch.files": 6, "cipherdm_torch.errors": 7,
    "cipherdm_torch": 0,  # the package's own __init__ / __main__: lazy entry points only
}


def room(module: str) -> str:
    return max((r for r in LAYERS if module == r or module.startswith(r + ".")), key=len)


def modules():
    """(dotted name, path) of every module of the package."""
    for folder, prefix in SOURCES.items():
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in sorted(files):
                if not f.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, f), os.path.join(ROOT, folder))
                parts = rel[:-3].split(os.sep)
                is_pkg = parts[-1] == "__init__"
                if is_pkg:
                    parts = parts[:-1]
                yield ".".join([prefix] + parts), os.path.join(dirpath, f), is_pkg


def project_imports(name, path, is_pkg):
    """(imported module, line number, is function-local, source line) for project imports."""
    with open(path) as f:
        source = f.read()
    tree = ast.parse(source)
    lines = source.splitlines()
    top = {id(n) for n in tree.body}
    for node in tree.body:  # `if TYPE_CHECKING:` / try blocks at module level count as top level
        for child in ast.walk(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)) and not isinstance(
                    node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                top.add(id(child))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [target]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            if t == "cipherdm_torch" or t.startswith("cipherdm_torch."):
                yield t, node.lineno, id(node) not in top, lines[node.lineno - 1]


ALL = list(modules())


def test_every_module_has_a_room():
    assert len(ALL) > 40
    for name, _, _ in ALL:
        assert room(name) in LAYERS, name


@pytest.mark.parametrize("name,path,is_pkg", ALL, ids=[m[0] for m in ALL])
def test_imports_point_down(name, path, is_pkg):
    mine = room(name)
    problems = []
    for target, line, local, text in project_imports(name, path, is_pkg):
        theirs = room(target)
        if mine == "cipherdm_torch" or theirs == mine:
            pass
        elif theirs == "cipherdm_torch":
            problems.append(f"line {line}: imports the package root ({target}); import the "
                            f"module that defines the name")
        elif LAYERS[theirs] <= LAYERS[mine]:
            problems.append(f"line {line}: {mine} (layer {LAYERS[mine]}) imports {target} "
                            f"({theirs}, layer {LAYERS[theirs]}): imports only point down")
        if local and "#" not in text:
            problems.append(f"line {line}: function-local import of {target} without a "
                            f"comment saying why it is local")
    assert not problems, f"{name} ({os.path.relpath(path, ROOT)}):\n" + "\n".join(problems)


def test_training_imports_without_crypten():
    code = ("import sys, cipherdm_torch.training, cipherdm_torch.diffusion, cipherdm_torch.data; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'crypten'); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_package_import_is_lazy():
    code = ("import sys, cipherdm_torch; "
            "heavy = [m for m in ('crypten', 'diffusers', 'opacus') if m in sys.modules]; "
            "assert not heavy, heavy; "
            "from cipherdm_torch import encrypt, launch; assert 'crypten' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
