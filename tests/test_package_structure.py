"""Structure rules of the package, checked on its source: no import circles, no environment
switches, and the layer reaching the kernels only through their public functions."""

from __future__ import annotations

import ast
import os
import re

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "megatron_dsa")


def _modules(root=ROOT):
    mods = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                name = os.path.relpath(path, os.path.dirname(root))[:-3].replace(os.sep, ".")
                mods[name.removesuffix(".__init__")] = path
    return mods


def import_graph(root=ROOT):
    """``{module: {package modules it imports}}`` from every import statement (lazy ones too);
    ``from . import sub`` counts as importing ``sub`` only, not the package."""
    mods = _modules(root)
    graph = {}
    for mod, path in mods.items():
        is_pkg = path.endswith("__init__.py")
        deps = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in mods)
            elif isinstance(node, ast.ImportFrom):
                base = mod if is_pkg else mod.rsplit(".", 1)[0]
                if node.level:
                    parts = base.split(".")
                    base = ".".join(parts[: len(parts) - (node.level - 1)])
                    target = base + ("." + node.module if node.module else "")
                else:
                    target = node.module
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
                deps.update(subs)
                if len(subs) < len(node.names) and target in mods:
                    deps.add(target)
        graph[mod] = deps - {mod}
    return graph


def find_cycles(graph):
    state, cycles = {}, []

    def visit(u, stack):
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                cycles.append(stack[stack.index(v):] + [v])
            elif v in graph and not state.get(v):
                visit(v, stack)
        stack.pop()
        state[u] = 2

    for m in sorted(graph):
        if not state.get(m):
            visit(m, [])
    return cycles


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_cycle_finder_sees_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_environment_reads_are_only_the_cache_location_and_triton_interpreter():
    allowed = {"MEGATRON_DSA_CACHE", "XDG_CACHE_HOME", "TRITON_INTERPRET"}
    seen = {}
    for mod, path in _modules().items():
        src = open(path).read()
        for key in re.findall(r"os\.environ(?:\.get)?\(?\[?\s*[\"']([A-Za-z_0-9]+)[\"']", src):
            seen.setdefault(key, []).append(mod)
        if re.search(r"os\.(getenv|environ\b(?!\.get\(|\[))", src):
            for m in re.finditer(r"os\.(getenv|environ\b(?!\.get\(|\[))", src):
                seen.setdefault("<dynamic>", []).append(mod)
    assert set(seen) <= allowed, {k: v for k, v in seen.items() if k not in allowed}


@pytest.mark.parametrize("module", ["megatron_dsa.attention", "megatron_dsa.spec", "megatron_dsa.graph"])
def test_layer_uses_public_kernel_functions_only(module):
    """The layer imports ``megatron_dsa.kernels.<op>`` packages, never an op's implementation
    modules or a private kernel module."""
    graph = import_graph()
    private = [d for d in graph[module] if d.startswith("megatron_dsa.kernels.")
               and (d.count(".") > 3 or d.rsplit(".", 1)[-1].startswith("_"))]
    assert not private, f"{module} reaches into {private}"
