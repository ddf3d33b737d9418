"""How a page shows its figures and its problems: charts, and `guard`, which turns a run that cannot be
read (missing, half-written, damaged, bad input) into one line in the page instead of a traceback."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import streamlit as st

from lab.errors import RunError


class PageError(Exception):
    """A problem to show as one line in the page (not a traceback)."""


@contextmanager
def guard(what: str = "") -> Iterator[None]:
    """Show a run that cannot be read as one `st.error` line, prefixed with `what` (e.g. the run's name).

    Everything inside the block after the failing call is skipped; the rest of the page goes on.
    """
    try:
        yield
    except (RunError, PageError, ValueError, OSError, KeyError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        st.error(f"{what}: {message}" if what else message, icon="⚠️")


def chart(fig, key: str) -> None:
    st.plotly_chart(fig, key=key, config={"displaylogo": False})
