"""Markup helpers shared by the pages: user text made inert, errors in words, one-shot messages."""
from __future__ import annotations

import string
import traceback

import streamlit as st

from selfclassifier_core.store.workspace import WorkspaceError

# the last entry of a "move to" list: move to a label typed in a text field next to it
NEW_LABEL = "\u2795 New label…"
NEW_LABEL_PROMPT = "Type a name for the new label first."

_MD_SPECIAL = set(string.punctuation)


def esc(text: object) -> str:
    """User text (a label name) made inert for Streamlit markdown and widget labels.

    Every ASCII punctuation character is backslash-escaped (valid CommonMark), so ``<b>``,
    ``[link](x)``, ``**``, ``:red[x]`` and ``$math$`` show as typed; line breaks become spaces.
    """
    s = " ".join(str(text).split())
    return "".join("\\" + c if c in _MD_SPECIAL else c for c in s)


def flash(message: str, kind: str = "success") -> None:
    """Show ``message`` once after the next rerun (e.g. "renamed")."""
    st.session_state["_flash"] = (kind, message)


def show_flash() -> None:
    """Show the message :func:`flash` left for this run, if any."""
    item = st.session_state.pop("_flash", None)
    if item:
        kind, message = item
        getattr(st, kind)(esc(message))  # messages quote label names: shown as typed


def error_in_words(exc: BaseException) -> str:
    """A one-line message for the person; no traceback."""
    if isinstance(exc, (WorkspaceError, ValueError, FileNotFoundError, KeyError, PermissionError,
                        NotADirectoryError)):
        msg = str(exc).strip("'\"")
    else:
        msg = f"{type(exc).__name__}: {exc}"
    return msg or type(exc).__name__


def show_error(exc: BaseException, what: str | None = None) -> None:
    """An error in words, the technical details folded away (for a bug report)."""
    st.error((f"{what}: " if what else "") + esc(error_in_words(exc)))
    with st.expander("Technical details"):
        st.code("".join(traceback.format_exception(exc))[-4000:], language=None)
