"""appliance/ imports downward only: no import cycle, whether the import sits at the top or in a function.

The graph is read from the modules' own ``import`` / ``from`` statements (``scripts/import_graph.py``;
imports under ``if TYPE_CHECKING:`` never run and are left out). A cycle fails the test with its path.
"""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["import_graph"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def test_appliance_has_no_import_cycle() -> None:
    tool = _tool()
    graph = tool.build_graph(ROOT)
    cycles = graph.cycles()
    assert not cycles, "import cycles in appliance/:\n" + "\n".join(
        " -> ".join(graph.cycle_path(c)) for c in cycles)
    print(tool.summary(graph))


def test_the_reader_sees_function_imports_and_skips_type_checking_ones(tmp_path: Path) -> None:
    tool = _tool()
    pkg = tmp_path / "appliance"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from appliance import b\n")
    (pkg / "b.py").write_text(textwrap.dedent("""\
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            from appliance.c import Thing
        def later():
            from appliance.sub.d import go
    """))
    (pkg / "c.py").write_text("import appliance.a\n")
    (pkg / "sub" / "d.py").write_text("from ..a import x\n")
    graph = tool.build_graph(tmp_path)
    assert graph.edges["appliance.b"] == {"appliance.sub.d"}, "the TYPE_CHECKING import is left out"
    assert graph.cycles() == [["appliance.a", "appliance.b", "appliance.sub.d"]]
    assert graph.cycle_path(["appliance.a", "appliance.b", "appliance.sub.d"]) == [
        "appliance.a", "appliance.b", "appliance.sub.d", "appliance.a"]
    floors = graph.floors()
    assert floors["appliance"] == 0 and floors["appliance.c"] == floors["appliance.a"] + 1
    assert "3 import cycles" not in tool.summary(graph) and "1 import cycles" in tool.summary(graph)
