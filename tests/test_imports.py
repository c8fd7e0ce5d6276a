"The package's imports run one way: layers -> blocks -> fast -> model -> convert -> weights -> factories -> ... -> train"

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "effnet_fastai"
ORDER = [
    "layers",
    "blocks",
    "fast",
    "model",
    "convert",
    "weights",
    "factories",
    "unet",
    "video",
    "data",
    "segdata",
    "patches",
    "learner",
    "interpret",
    "checkpoint",
    "export",
    "train",
    "mri",
]


def _own_imports(tree):
    "(module imported from this package, the node that imports it) for every import of `effnet_fastai` in `tree`"
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                names = [node.module] if node.module else [a.name for a in node.names]
            elif (node.module or "").startswith("effnet_fastai"):
                names = [node.module.split(".")[1]] if "." in node.module else [a.name for a in node.names]
            else:
                continue
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1] for a in node.names if a.name.startswith("effnet_fastai.")]
        else:
            continue
        for n in names:
            yield n, node


def graph():
    "Module -> the package modules it imports, and the imports found inside functions"
    g, nested = {}, []
    for f in sorted(PKG.glob("*.py")):
        if f.stem.startswith("_"):
            continue
        tree = ast.parse(f.read_text())
        top = {id(n) for n in tree.body}
        g[f.stem] = set()
        for name, node in _own_imports(tree):
            g[f.stem].add(name)
            if id(node) not in top:
                nested.append((f.stem, name, node.lineno))
    return g, nested


def backward_imports(g):
    "(module, dependency) pairs of `g` where the dependency is the module itself or comes after it in ORDER"
    return sorted((m, d) for m, ds in g.items() for d in ds if ORDER.index(d) >= ORDER.index(m))


def test_no_cycle_and_one_direction():
    "Every import points to an earlier module, so the graph has no cycle"
    g, _ = graph()
    assert set(g) == set(ORDER), sorted(set(g) ^ set(ORDER))  # a new module gets its place in ORDER
    assert backward_imports(g) == []


def test_no_import_inside_a_function():
    "An import inside a function to dodge a cycle means the design is wrong"
    _, nested = graph()
    assert not nested, nested


def test_detects_a_cycle():
    "The check can fail: the cycle model -> weights -> model of version 0.1 is caught"
    assert backward_imports({"model": {"layers", "weights"}, "weights": {"model"}}) == [("model", "weights")]
