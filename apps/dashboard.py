"""calib dashboard: ``calib dashboard [--store DIR]`` or ``streamlit run apps/dashboard.py -- --store DIR``.

Declares the pages with ``st.navigation``; each page is one file under ``views/``
and reads the run store through ``state.py``. (The folder is not called ``pages/``:
Streamlit treats a ``pages/`` folder beside the entry script as a v1 multipage app
on a session's first run, which bypasses ``st.navigation``.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # views import state.py and widgets.py from here
    sys.path.insert(0, str(_HERE))

import state  # noqa: E402

st.set_page_config(page_title="calib", page_icon=":material/tune:", layout="wide")

PAGES = [
    st.Page(str(_HERE / "views" / "runs.py"), title="Runs", icon=":material/list:", default=True),
    st.Page(str(_HERE / "views" / "layers.py"), title="Layers", icon=":material/stacked_line_chart:"),
    st.Page(str(_HERE / "views" / "data.py"), title="Data drift", icon=":material/compare_arrows:"),
    st.Page(str(_HERE / "views" / "calibration_set.py"), title="Calibration set", icon=":material/photo_library:"),
    st.Page(str(_HERE / "views" / "compare_runs.py"), title="Compare runs", icon=":material/difference:"),
]

nav = st.navigation(PAGES)
with st.sidebar:
    st.caption(f"run store: `{state.store_root()}`")
    sel = state.selected_runs()
    if sel:
        st.caption("selected: " + ", ".join(f"`{r}`" for r in sel))
nav.run()
