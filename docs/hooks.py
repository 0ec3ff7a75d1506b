"""MkDocs hooks: pages parts generated from the code at build time, so they cannot drift."""

from __future__ import annotations

import re
from typing import Any


def forms_table() -> str:
    """The method × member-form table of :data:`diverse.METHODS`."""
    import diverse
    from diverse.nets.forms import FORMS

    cols = [*FORMS, "heterogeneous"]
    lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, spec in diverse.METHODS.items():
        lines.append(f"| `{name}` | "
                     + " | ".join("yes" if c in spec.forms else "—" for c in cols) + " |")
    return "\n".join(lines)


def on_page_markdown(markdown: str, **_kwargs: Any) -> str:
    return re.sub(r"<!-- forms-table -->.*?<!-- /forms-table -->",
                  lambda _m: forms_table(), markdown, flags=re.S)
