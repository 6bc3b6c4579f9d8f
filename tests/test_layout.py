"""No module of the package imports itself back through any chain: a cycle anywhere, also inside one
layer of the import contracts (which `make lint` checks with `lint-imports`), fails here."""

from __future__ import annotations

import grimp


def test_no_import_cycles():
    graph = grimp.build_graph("steer_server", cache_dir=None)
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            back = graph.find_shortest_chain(importer=imported, imported=module)
            if back is not None:
                cycles.append(" -> ".join([module, *back]))
    assert not cycles, "\n".join(cycles)
