"""Runs: every run with its data, config, status and metrics; loss curves, metrics and settings side by
side; resume an interrupted run; delete."""
import pandas as pd
import streamlit as st

from core.runs.jobs import cancel_run, delete_run, resume_run
from core.runs.overview import METRICS, epoch_curves, resume_offer, runs_table, settings_side_by_side
from pages.common import engine, flash, show_flash, storage_notice
from pages.run_widgets import METRIC_NAMES
from pages.runs_charts import loss_chart, precision_chart
from pages.signin import can, why_not
from storage.settings import StorageError

st.title("Runs")
show_flash()
storage_notice()
table = pd.DataFrame(runs_table(engine()))  # with a "Ray job" column when runs went to a Ray cluster
if table.empty:
    st.info("No run yet: start one on the Train page.")
    st.stop()

st.dataframe(table, hide_index=True, width="stretch",
             column_config={m: st.column_config.NumberColumn(METRIC_NAMES[m], format="%.3f") for m in METRICS})

ids = table["run"].tolist()
chosen = st.multiselect("Compare runs", ids, default=ids[: min(3, len(ids))])
if chosen:
    curves = pd.DataFrame(epoch_curves(engine(), chosen))
    if not curves.empty:
        st.subheader("Loss per epoch")
        st.caption("One panel per objective, each on its own scale: their losses are not comparable.")
        st.altair_chart(loss_chart(curves))
        if curves["precision_at_1"].notna().any():
            st.subheader("Precision@1 per epoch")
            st.caption("On each run's probe (up to 10,000 test images) after each epoch; the table's metrics are "
                       "the whole test set's, at the end.")
            st.altair_chart(precision_chart(curves), width="stretch")
    st.subheader("Metrics side by side")
    metrics = table[table["run"].isin(chosen)].set_index("run")[list(METRICS)].T.rename(index=METRIC_NAMES)
    metrics.columns = [f"#{run_id}" for run_id in metrics.columns]  # as the settings' columns
    st.dataframe(metrics, width="stretch")
    st.subheader("Settings side by side")
    settings = settings_side_by_side(engine(), [int(run_id) for run_id in chosen])
    differing = sum(bool(row["differs"]) for row in settings)
    if len(chosen) > 1:
        st.caption(f"{differing} of {len(settings)} settings differ (first, marked ≠)." if differing
                   else "Their settings are the same.")
    st.dataframe(settings, hide_index=True, width="stretch", height="content")  # every setting, no inner scroll

st.divider()
left, right = st.columns(2)
with left:
    target = st.selectbox("Run", ids, format_func=lambda i: f"#{i}", key="manage")
    offer = resume_offer(engine(), int(target))
    resume_after = offer.resume_after
    if resume_after is not None:
        st.caption(f"Run #{target} stopped ({offer.status}) with a checkpoint after epoch {resume_after} of "
                   f"{offer.total_epochs}; resuming continues it from there under the same number.")
with right:
    if offer.active and st.button("Cancel run"):
        try:
            cancel_run(engine(), int(target))
        except (ValueError, StorageError) as exc:  # not theirs to cancel (core.access), or a locked database  # the database stayed locked (a stalled worker): a sentence
            st.error(str(exc))
        else:
            flash(f"Asked run #{target} to stop.", "info")
            st.rerun()
    if resume_after is not None and can("train") and st.button(f"Resume from epoch {resume_after}", type="primary"):
        try:
            resume_run(engine(), int(target))
        except (ValueError, LookupError, StorageError) as exc:
            st.error(str(exc))
        else:
            flash(f"Run #{target} resumed from epoch {resume_after}; follow it on the Train page.")
            st.rerun()
    confirm = st.checkbox(f"Yes, delete run #{target} and its files", disabled=not can("delete"),
                          help=None if can("delete") else why_not("delete"))
    if st.button("Delete run", disabled=not confirm or not can("delete")):
        try:
            delete_run(engine(), int(target))
        except (ValueError, StorageError) as exc:
            st.error(str(exc))
        else:
            flash(f"Deleted run #{target}.")
            st.rerun()
