"""The Train page's section that embeds a dataset with a stored run's encoder or a checkpoint file."""
import streamlit as st

from core.runs.jobs import create_embedding_run, start_worker
from core.runs.overview import run_snapshots, stored_encoder
from models.checkpoint import CheckpointError
from pages.common import engine, flash
from storage.settings import StorageError


def load_encoder_section(names: list[str]) -> None:
    """names: the datasets that can be embedded."""
    st.subheader("Load an encoder instead")
    st.caption("Embed a dataset with the encoder of a stored run, or with a checkpoint file this app wrote (.safetensors).")
    sources = {r.id: f"#{r.id} {r.dataset_name} · {r.config.get('encoder')}"
               for r in run_snapshots(engine(), completed_only=True, kind="train") if r.checkpoint}
    target = st.selectbox("Dataset to embed", names, key="embed-dataset")
    source = st.radio("Encoder", ["a stored run", "a checkpoint file"], horizontal=True)
    source_run = upload = None
    if source == "a stored run":
        source_run = st.selectbox("Run", list(sources), format_func=sources.get) if sources else None
        if not sources:
            st.caption("No completed training run yet.")
    else:
        upload = st.file_uploader("Checkpoint", type=["safetensors"])
    if not st.button("Embed with this encoder", disabled=source_run is None and upload is None):
        return
    try:
        if upload is not None:
            data, file_name = upload.getvalue(), upload.name
        else:
            data, file_name = stored_encoder(engine(), source_run), f"run {source_run} encoder"
        run_id = create_embedding_run(engine(), target, data, file_name, source_run)
    except (CheckpointError, LookupError, ValueError, StorageError) as exc:
        st.error(str(exc))
        return
    st.session_state["watching"] = run_id
    try:
        start_worker(engine(), run_id)
    except ValueError as exc:
        st.error(str(exc))
    else:
        flash(f"Run #{run_id} embeds {target} with this encoder.", "info")
        st.rerun()
