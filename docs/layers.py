"""Draw the layers of lora_tools from its import graph, and count its import levels.

    python docs/layers.py           # rewrite the picture and figures in docs/architecture.md
    python docs/layers.py --check   # exit 1 if docs/architecture.md is not current
    python docs/layers.py --figures # only print the figures (run it from any checkout)

The graph is grimp's (what import-linter reads): every import statement, those in
functions and under TYPE_CHECKING too. The layer order is the layers contract in
pyproject.toml. ``lora_tools/__init__.py`` (the public API, which re-exports from every
layer) is left out of the counts: nothing below imports it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grimp
import networkx as nx

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "architecture.md"
BEGIN, END = "<!-- layers.py: begin -->", "<!-- layers.py: end -->"


def module_graph() -> nx.DiGraph:
    sys.path.insert(0, str(Path.cwd()))
    g = grimp.build_graph("lora_tools", include_external_packages=False)
    dg = nx.DiGraph()
    for m in g.modules:
        if m != "lora_tools":
            dg.add_node(m)
    for m in list(dg.nodes):
        for d in g.find_modules_directly_imported_by(m):
            if d != "lora_tools":
                dg.add_edge(m, d)
    return dg


def package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def levels(dg: nx.DiGraph) -> int:
    """Modules on the longest import chain; a cycle counts as one level."""
    return int(nx.dag_longest_path_length(nx.condensation(dg))) + 1


def figures(dg: nx.DiGraph) -> dict[str, int]:
    pg = nx.DiGraph()
    pg.add_nodes_from({package(m) for m in dg.nodes})
    pg.add_edges_from((package(a), package(b)) for a, b in dg.edges if package(a) != package(b))
    return {
        "modules": dg.number_of_nodes(),
        "module levels": levels(dg),
        "module cycles": sum(1 for c in nx.strongly_connected_components(dg) if len(c) > 1),
        "packages": pg.number_of_nodes(),
        "package levels": levels(pg),
        "package cycles": sum(1 for c in nx.strongly_connected_components(pg) if len(c) > 1),
    }


def contract_layers() -> list[list[str]]:
    import tomllib

    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())
    layers = cfg["tool"]["importlinter"]["contracts"][0]["layers"]
    return [[p.strip() for p in layer.split("|")] for layer in layers]


def mermaid(dg: nx.DiGraph) -> list[str]:
    """Packages top to bottom in contract order; an arrow where one imports another."""
    edges = sorted({(package(a), package(b)) for a, b in dg.edges if package(a) != package(b)})
    layers = contract_layers()
    listed = {p for layer in layers for p in layer}
    # what the contract does not name (``__main__``: python -m lora_tools) goes on top
    layers.insert(0, sorted({package(m) for m in dg.nodes} - listed))
    short = {p: p.removeprefix("lora_tools.") for layer in layers for p in layer}
    lines = ["```mermaid", "flowchart TD"]
    for i, layer in enumerate(layers):
        lines.append(f'  subgraph L{i}[" "]')
        lines += [f"    {short[p]}[{short[p]}]" for p in layer]
        lines.append("  end")
    lines += [f"  {short[a]} --> {short[b]}" for a, b in edges]
    return [*lines, "```"]


def generated(dg: nx.DiGraph) -> str:
    # Only the figures that change with the architecture, not with each new module.
    f = {k: v for k, v in figures(dg).items() if k not in ("modules", "module levels")}
    table = ["| figure | now |", "|---|---|"] + [f"| {k} | {v} |" for k, v in f.items()]
    return "\n".join([BEGIN, *mermaid(dg), "", *table, END])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--figures", action="store_true")
    args = ap.parse_args()
    dg = module_graph()
    if args.figures:
        print(figures(dg))
        return 0
    text = DOC.read_text()
    head, rest = text.split(BEGIN)
    tail = rest.split(END)[1]
    new = head + generated(dg) + tail
    if args.check:
        return 0 if new == text else 1
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
