"""One file per screen, run as a page by ``st.navigation`` in ``app/main.py``.

Each file ends with ``if __name__ == "__main__": render(session.current())``: Streamlit runs a
page as ``__main__``, so importing one (a test reading its constants) renders nothing.
"""
