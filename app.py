"""Embedding Lab: navigation and the shared engine; every page lives in pages/."""
from pathlib import Path

import streamlit as st

# absolute page paths: the app also runs from deploy/streamlit_app.py (hosted Streamlit)
PAGES = Path(__file__).resolve().parent / "pages"

st.set_page_config(page_title="Embedding Lab", page_icon=":material/explore:", layout="wide")

from pages.signin import gate  # noqa: E402  (after set_page_config: it may draw)

# who this run acts for (sign-in and roles, or the demo); False: it drew the sign-in instead
allowed = gate()

navigation = st.navigation(
    [
        st.Page(PAGES / "data.py", title="Data", icon=":material/photo_library:", default=True),
        st.Page(PAGES / "train.py", title="Train", icon=":material/model_training:"),
        st.Page(PAGES / "triplets.py", title="Triplets", icon=":material/change_history:"),
        st.Page(PAGES / "explore.py", title="Explore", icon=":material/scatter_plot:"),
        st.Page(PAGES / "compare.py", title="Compare", icon=":material/compare:"),
        st.Page(PAGES / "runs.py", title="Runs", icon=":material/table_rows:"),
    ],
    position="sidebar" if allowed else "hidden",  # before sign-in, no page is offered
)
if allowed:
    navigation.run()
