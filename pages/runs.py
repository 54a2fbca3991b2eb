"""Runs: every run with its data, config, status and metrics; loss curves side by side; resume an
interrupted run; delete."""
import altair as alt
import pandas as pd
import streamlit as st

from core.runs.jobs import cancel_run, delete_run, resumable_epoch, resume_run
from pages.common import engine, flash, show_flash, storage_notice
from storage.hosting import lost_files
from storage import queries
from storage.db import transaction
from storage.schema import Run
from storage.settings import StorageError

METRICS = ("precision_at_1", "r_precision", "map_at_r", "recall_at_1", "recall_at_5", "recall_at_10")

st.title("Runs")
show_flash()
storage_notice()
with transaction(engine()) as session:
    runs = list(queries.list_runs(session))
    table = pd.DataFrame([
        {
            "run": r.id, "status": r.status, "kind": r.kind,
            "dataset": r.dataset.name,
            "encoder": r.config.get("encoder") if r.kind == "train" else (r.config.get("encoder") or {}).get("encoder"),
            "objective": r.config.get("loss", "—"), "miner": r.config.get("miner", "—"),
            "epochs": f"{r.epoch}/{r.config.get('epochs', '—')}", "device": r.device,
            "seconds": round(r.seconds, 1) if r.seconds is not None else None,
            **{m: (r.metrics or {}).get(m) for m in METRICS},
            "files": ("lost" if lost_files([r.checkpoint, r.embeddings]) else "kept") if r.status == "completed" else "",
            "reason": (r.reason or "").splitlines()[0] if r.reason else "",
            "started": r.started_at,
        }
        for r in runs
    ])
if table.empty:
    st.info("No run yet: start one on the Train page.")
    st.stop()
if any(r.job_id for r in runs):  # runs submitted to a Ray cluster: which job ran each
    table.insert(table.columns.get_loc("device") + 1, "Ray job", [r.job_id or "" for r in runs])

st.dataframe(table, hide_index=True, width="stretch",
             column_config={m: st.column_config.NumberColumn(format="%.3f") for m in METRICS})

ids = table["run"].tolist()
chosen = st.multiselect("Compare runs", ids, default=ids[: min(3, len(ids))])
if chosen:
    with transaction(engine()) as session:
        curves = pd.DataFrame([{"run": f"#{e.run_id}", "epoch": e.epoch, "loss": e.loss}
                               for e in queries.epoch_rows(session, chosen)])
    if not curves.empty:
        st.subheader("Loss per epoch")
        st.altair_chart(alt.Chart(curves).mark_line(point=True).encode(
            x=alt.X("epoch:Q", axis=alt.Axis(tickMinStep=1, format="d")), y="loss:Q", color="run:N", tooltip=["run", "epoch", "loss"]).properties(height=260),
            width="stretch")
    st.subheader("Metrics side by side")
    st.dataframe(table[table["run"].isin(chosen)].set_index("run")[list(METRICS)].T, width="stretch")

st.divider()
left, right = st.columns(2)
with left:
    target = st.selectbox("Run", ids, format_func=lambda i: f"#{i}", key="manage")
    status = table.loc[table["run"] == target, "status"].iloc[0]
    with transaction(engine()) as session:
        run = session.get(Run, int(target))
        resume_after = resumable_epoch(run)
        total_epochs = run.config.get("epochs")
    if resume_after is not None:
        st.caption(f"Run #{target} stopped ({run.status}) with a checkpoint after epoch {resume_after} of "
                   f"{total_epochs}; resuming continues it from there under the same number.")
with right:
    if status in queries.ACTIVE and st.button("Cancel run"):
        try:
            cancel_run(engine(), int(target))
        except StorageError as exc:  # the database stayed locked (a stalled worker): a sentence
            st.error(str(exc))
        else:
            flash(f"Asked run #{target} to stop.", "info")
            st.rerun()
    if resume_after is not None and st.button(f"Resume from epoch {resume_after}", type="primary"):
        try:
            resume_run(engine(), int(target))
        except (ValueError, LookupError, StorageError) as exc:
            st.error(str(exc))
        else:
            flash(f"Run #{target} resumed from epoch {resume_after}; follow it on the Train page.")
            st.rerun()
    confirm = st.checkbox(f"Yes, delete run #{target} and its files")
    if st.button("Delete run", disabled=not confirm):
        try:
            delete_run(engine(), int(target))
        except StorageError as exc:
            st.error(str(exc))
        else:
            flash(f"Deleted run #{target}.")
            st.rerun()
