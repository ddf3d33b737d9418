"""How a page shows its figures and its problems: charts, and `guard`, which turns a run that cannot be
read (missing, half-written, damaged, bad input) into one line in the page instead of a traceback."""

from __future__ import annotations

from concurrent.futures import Future
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


def classification_only(run, page: str) -> None:
    """Raise PageError (one line) when `run` is a next-token run (a target at every position): `page` reads one
    answer at one position, and the Induction heads page is the one for these runs."""
    if run.task.read_position is None:
        raise PageError(f"the {page} page applies to classification runs (one answer read at one position); this run "
                        f"(task {run.task.name!r}) predicts the next token at every position: see the Induction heads page")


def when_ready(future: Future, message: str, poll_s: float = 1.0):
    """The result of background work (`background.submit`) if it is done; else None, with `message` shown
    and the page drawn again by itself as soon as the work is done. An error of the work is raised here."""
    if future.done():
        return future.result()
    st.info(message, icon="⏳")

    @st.fragment(run_every=poll_s)
    def _poll() -> None:
        if future.done():
            st.rerun()  # the whole page, now with the result

    _poll()
    return None


def chart(fig, key: str) -> None:
    st.plotly_chart(fig, key=key, config={"displaylogo": False})
