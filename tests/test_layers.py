"""The package's import layers: lower layers never import higher ones, not even inside a function.

The module graph is read from the source (``ast``), so imports inside functions — the ones that
hide a cycle until some call runs them — count like top-level ones. Rules checked:

* every module of ``flashoptim_dist`` has a layer in :data:`LAYERS` (a new module fails here:
  add it to the table, at the lowest layer whose modules it may import);
* an import goes to a lower layer, or to a module of the same layer in the importer's own package
  or a package nested in it (``checkpoint._save`` → ``checkpoint._format``, ``cli`` →
  ``train.cli``); two sibling packages of one layer (``distributed``, ``deepspeed``) do not
  import each other;
* submodules never import the package root ``flashoptim_dist`` (it only re-exports the public
  API): they import the module that defines the name;
* the module graph has no cycle.

Importing ``a.b.c`` also runs ``a/__init__`` and ``a/b/__init__``; those implicit edges are not
counted (the root would otherwise sit below everything). Strings passed to ``importlib`` are not
seen; the trainer's optimizer table names defining modules for that reason.
"""

from __future__ import annotations

import ast
import pathlib


ROOT = pathlib.Path(__file__).resolve().parents[1] / "flashoptim_dist"

#: Lowest first. A module may import modules of lower layers, and of its own layer in its own
#: package. Packages are listed by their ``__init__`` name; "pkg.*" covers every module in it.
LAYERS = [
    # 0: leaves — names, process-group facts, errors, the numeric config, small helpers
    ["flashoptim_dist._names", "flashoptim_dist._dist", "flashoptim_dist._errors", "flashoptim_dist._version",
     "flashoptim_dist.config", "flashoptim_dist.utils",
     # the launcher-environment pieces behind launch_env (standard library only: launch/torchrun.sh
     # runs launch_env.py as a file, before torch is importable)
     "flashoptim_dist._launch", "flashoptim_dist._launch.*"],
    # 1: element numerics (ρ, companders, scales) and the shard contract (segments, layouts)
    ["flashoptim_dist.numerics", "flashoptim_dist.layout"],
    # 2: canonical groups across shards; DTensor placements → segments
    ["flashoptim_dist.canonical", "flashoptim_dist.placements"],
    # 3: the update math, one segment at a time (the kernels' specification)
    ["flashoptim_dist.reference"],
    # 4: the fused Triton kernel
    ["flashoptim_dist.kernels", "flashoptim_dist.kernels.*"],
    # 5: the optimizer classes and their state I/O
    ["flashoptim_dist.optim", "flashoptim_dist.optim.*"],
    # 6: gradient release (core; engines register checks into it)
    ["flashoptim_dist.release"],
    # 7: engine adapters
    ["flashoptim_dist.distributed", "flashoptim_dist.distributed.*", "flashoptim_dist.deepspeed",
     "flashoptim_dist.deepspeed.*"],
    # 8: canonical checkpoints (read every engine's layout)
    ["flashoptim_dist.checkpoint", "flashoptim_dist.checkpoint._*"],
    # 9: what a training job is built from besides the optimizer
    ["flashoptim_dist.data", "flashoptim_dist.models", "flashoptim_dist.models.*", "flashoptim_dist.launch_env"],
    # 10: frameworks and the trainer
    ["flashoptim_dist.integrations", "flashoptim_dist.integrations.*", "flashoptim_dist.train",
     "flashoptim_dist.train.*"],
    # 11: command lines
    ["flashoptim_dist.cli", "flashoptim_dist.checkpoint.cli", "flashoptim_dist.train.cli",
     "flashoptim_dist.train.__main__"],
    # 12: the package root: re-exports the public API
    ["flashoptim_dist"],
]


def module_files(root: pathlib.Path = ROOT) -> dict:
    """{dotted module name: path} of every ``.py`` under ``root`` (packages by their ``__init__``)."""
    out = {}
    for p in sorted(root.rglob("*.py")):
        parts = p.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def imports_of(name: str, source: str, is_package: bool, known) -> set:
    """``(target module, line)`` of every import in ``source`` (at any depth) that names a module
    in ``known``. ``from X import y`` counts ``X.y`` when that is a module, else ``X``."""
    pkg = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
            cands = subs if len(subs) == len(node.names) else subs + [target]
        elif isinstance(node, ast.Import):
            cands = [a.name for a in node.names]
        else:
            continue
        for c in cands:
            if c in known and c != name:
                found.add((c, node.lineno))
    return found


def module_graph(files: dict) -> dict:
    """{module: {(imported module, line), ...}} for ``files`` from :func:`module_files`."""
    return {n: imports_of(n, p.read_text(), p.name == "__init__.py", files) for n, p in files.items()}


def layer_of(name: str, layers=LAYERS):
    """Index of ``name``'s layer: an exact entry first, else the longest matching "pkg.*"/"pkg._*"."""
    for i, entries in enumerate(layers):
        if name in entries:
            return i
    best, best_len = None, -1
    for i, entries in enumerate(layers):
        for e in entries:
            if e.endswith("*"):
                prefix = e[:-1]
                if name.startswith(prefix) and len(prefix) > best_len:
                    best, best_len = i, len(prefix)
    return best


def _package(name: str, files: dict) -> str:
    return name if files[name].name == "__init__.py" else name.rpartition(".")[0]


def _inside(pkg: str, outer: str) -> bool:
    """``pkg`` is ``outer`` or a package nested in it."""
    return pkg == outer or pkg.startswith(outer + ".")


def check(graph: dict, files: dict, layers=LAYERS) -> list:
    """Every violation of the rules in the module docstring, as readable lines."""
    problems = []
    for name in sorted(graph):
        if layer_of(name, layers) is None:
            problems.append(f"{name} has no layer: add it to LAYERS in tests/test_layers.py "
                            "(the lowest layer whose modules it may import)")
    for a in sorted(graph):
        la = layer_of(a, layers)
        for b, line in sorted(graph[a]):
            lb = layer_of(b, layers)
            if la is None or lb is None:
                continue
            where = f"{a} (line {line}) imports {b}"
            if b == "flashoptim_dist" and a != "flashoptim_dist":
                problems.append(f"{where}: the package root only re-exports; import the defining module")
            elif lb > la:
                problems.append(f"{where}: layer {la} must not import layer {lb}")
            elif lb == la and not _inside(_package(b, files), _package(a, files)):
                problems.append(f"{where}: same layer {la} but another package; move one of them a layer down")
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return problems


def cycles(graph: dict) -> list:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    adj = {a: sorted({b for b, _ in bs if b in graph}) for a, bs in graph.items()}
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in adj[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(_cycle_in(sorted(comp), adj))

    for v in sorted(adj):
        if v not in index:
            visit(v)
    return out


def _cycle_in(comp: list, adj: dict) -> list:
    """A shortest cycle through the component's first module: breadth-first search back to it."""
    start, members = comp[0], set(comp)
    prev, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in adj[v]:
                if w == start:
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    return path[::-1] + [start]
                if w in members and w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp  # pragma: no cover (a strongly connected component always has a cycle)


# ---------------------------------------------------------------------------------------------


def test_layers_hold():
    files = module_files()
    assert "flashoptim_dist.optim.base" in files and "flashoptim_dist.reference" in files
    problems = check(module_graph(files), files)
    assert not problems, "\n".join(problems)


def test_graph_sees_function_level_and_relative_imports():
    files = module_files()
    graph = module_graph(files)
    # optim.base imports the kernel inside a function, relatively
    assert any(b == "flashoptim_dist.kernels.fused_step" for b, _ in graph["flashoptim_dist.optim.base"])
    # `from .. import placements as dt` resolves to the module, not to the root package
    assert any(b == "flashoptim_dist.placements" for b, _ in graph["flashoptim_dist.distributed.fsdp2"])


def _synthetic(tmp_path, sources: dict) -> tuple:
    root = tmp_path / "flashoptim_dist"
    for rel, text in sources.items():
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    files = module_files(root)
    return module_graph(files), files


def test_checker_reports_a_back_edge_a_cycle_and_a_root_import(tmp_path):
    layers = [["flashoptim_dist.low"], ["flashoptim_dist.high", "flashoptim_dist.other"], ["flashoptim_dist"]]
    graph, files = _synthetic(tmp_path, {
        "__init__.py": "from .high import x\n",
        # a lower layer reaching up, hidden inside a function
        "low.py": "def f():\n    from .high import x\n    return x\n",
        "high.py": "from . import low\nx = 1\n",
        "other.py": "from . import low\nimport flashoptim_dist\n",
    })
    problems = check(graph, files, layers)
    text = "\n".join(problems)
    assert "flashoptim_dist.low (line 2) imports flashoptim_dist.high: layer 0 must not import layer 1" in text
    assert "import cycle: flashoptim_dist.high -> flashoptim_dist.low -> flashoptim_dist.high" in text
    assert "flashoptim_dist.other (line 2) imports flashoptim_dist: the package root only re-exports" in text
    assert len(problems) == 3, text


def test_checker_reports_a_module_without_layer_and_a_sideways_import(tmp_path):
    layers = [["flashoptim_dist.a", "flashoptim_dist.a.*", "flashoptim_dist.b", "flashoptim_dist.b.*"],
              ["flashoptim_dist"]]
    graph, files = _synthetic(tmp_path, {
        "__init__.py": "",
        "a/__init__.py": "from .m import y\n",
        "a/m.py": "from ..b import z\ny = 1\n",
        "b/__init__.py": "z = 2\n",
        "new_module.py": "",
    })
    text = "\n".join(check(graph, files, layers))
    assert "flashoptim_dist.new_module has no layer: add it to LAYERS in tests/test_layers.py" in text
    assert "flashoptim_dist.a.m (line 1) imports flashoptim_dist.b: same layer 0 but another package" in text
    # inside one package the same layer is fine
    assert "flashoptim_dist.a (line 1)" not in text


def test_names_table_matches_the_classes():
    from flashoptim_dist import _names
    from flashoptim_dist.optim import flash

    for name in _names.FLASH_OPTIMIZER_NAMES:
        cls = getattr(flash, name)
        assert cls.family == _names.FAMILY_OF[name] == _names.FAMILY_OF[_names.BASELINE_OF[name]]
        assert cls.decoupled == (name in _names.DECOUPLED_DECAY)
    assert set(_names.DEFAULT_OF_FAMILY.values()) <= set(_names.FLASH_OPTIMIZER_NAMES)
    assert _names.flash_optimizer_name("flashsgdw") == "FlashSGDW" and _names.flash_optimizer_name("AdamW") is None
