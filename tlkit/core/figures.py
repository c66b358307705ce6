"""PNG figures with matplotlib's object API. No pyplot: tlkit never switches the backend of
the process it runs in (a user's notebook keeps its own), and no figure lingers in pyplot's
global list."""

from __future__ import annotations

import io
from typing import Any


def new_figure(width: float, height: float) -> Any:
    """A figure of width x height inches at 100 dpi, drawn by the Agg canvas when saved."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def png_bytes(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
