"""Embedding Lab: navigation and the shared engine; every page lives in pages/."""
import streamlit as st

st.set_page_config(page_title="Embedding Lab", page_icon=":material/explore:", layout="wide")

navigation = st.navigation(
    [
        st.Page("pages/data.py", title="Data", icon=":material/photo_library:", default=True),
        st.Page("pages/train.py", title="Train", icon=":material/model_training:"),
        st.Page("pages/triplets.py", title="Triplets", icon=":material/change_history:"),
        st.Page("pages/explore.py", title="Explore", icon=":material/scatter_plot:"),
        st.Page("pages/runs.py", title="Runs", icon=":material/table_rows:"),
    ]
)
navigation.run()
