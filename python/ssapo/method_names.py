"""The names and help of the methods, read from the text of their modules in ssapo/methods/ (one module per
method, each declaring `METHOD = Method(name=..., help=...)`), so that ssapo.config can offer them as the
`method` field's choices without importing the method table. A leaf: it imports nothing of the project.
"""

from __future__ import annotations

import os
from typing import Dict


def declared_methods() -> Dict[str, str]:
    """{name: help} of every method module in ssapo/methods/, in module order, read from the text of its
    `METHOD = Method(name="...", help="...", ...)` declaration, without importing it: ssapo.config takes the
    method field's choices and help from here, not from the method table (ssapo.methods.TABLE, which imports
    the modules and what they use); tests/loop/test_methods.py checks both agree."""
    import ast

    d = os.path.join(os.path.dirname(os.path.abspath(__file__)), "methods")
    out: Dict[str, str] = {}
    for fn in sorted(f for f in os.listdir(d) if f.endswith(".py") and not f.startswith("_")):
        path = os.path.join(d, fn)
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in tree.body:
            if (
                isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "METHOD" for t in node.targets)
                and isinstance(node.value, ast.Call)
            ):
                kw = {k.arg: k.value for k in node.value.keywords}
                try:
                    out[ast.literal_eval(kw["name"])] = ast.literal_eval(kw["help"]) if "help" in kw else ""
                except (KeyError, ValueError) as e:
                    raise TypeError(
                        f"{path}: METHOD = Method(name=..., help=...) must give name and help as plain strings "
                        f"(ssapo.config reads them without importing the module): {e}"
                    ) from None
    return out
