"""Embedding Lab: navigation and the shared engine; every page lives in pages/."""
import streamlit as st

st.set_page_config(page_title="Embedding Lab", page_icon="🧭", layout="wide")

navigation = st.navigation(
    [
        st.Page("pages/data.py", title="Data", icon="🖼️", default=True),
        st.Page("pages/train.py", title="Train", icon="🏋️"),
        st.Page("pages/triplets.py", title="Triplets", icon="🔺"),
        st.Page("pages/explore.py", title="Explore", icon="🗺️"),
        st.Page("pages/runs.py", title="Runs", icon="📋"),
    ]
)
navigation.run()
