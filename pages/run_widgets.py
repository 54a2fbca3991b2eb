"""The widgets that show runs: a run's card (status, progress, result, Cancel), its one-line
label, and the run picker the Triplets and Explore pages open with."""
from __future__ import annotations

from typing import Callable, Optional

import streamlit as st

from core.runs.jobs import cancel_run
from core.runs.overview import RunSnapshot, run_snapshot, run_snapshots
from pages.common import engine, flash
from pages.run_live import loss_curve, timing
from pages.signin import can
from storage.settings import StorageError

METRIC_NAMES = {"precision_at_1": "Precision@1", "r_precision": "R-Precision", "map_at_r": "MAP@R",
                "recall_at_1": "Recall@1", "recall_at_5": "Recall@5", "recall_at_10": "Recall@10"}

# Material icons: they render without an emoji font (hosted machines often lack one)
STATUS_ICON = {
    "queued": ":material/schedule:", "running": ":material/directions_run:", "completed": ":material/check_circle:",
    "failed": ":material/error:", "cancelled": ":material/cancel:", "interrupted": ":material/warning:",
}


def run_label(run: RunSnapshot) -> str:
    metric = ""
    if run.metrics and "precision_at_1" in run.metrics:
        metric = f" · P@1 {run.metrics['precision_at_1']:.3f}"
    config = run.config or {}
    what = f"{config.get('loss', 'loaded encoder')}" if run.kind == "train" else "loaded encoder"
    return f"#{run.id} {run.dataset_ref} · {what} · {run.status}{metric}"


def run_card(run: RunSnapshot, epochs: Optional[list[dict]] = None, shown_here: Optional[tuple] = None,
             place: int = 0) -> None:
    """A run's status, progress, mining counts and result (metrics, or why it ended); Cancel,
    the time elapsed and left, and a live loss curve while active. epochs: the run's stored
    epochs (core.runs.overview.epoch_curves' rows), for the curve; shown_here: what this card's
    place steadily showed, (run id, status), or None (steady_places); place: the card's place
    among the panel's (its container's CSS class is st-key-run-card-<place>).

    The browser shows each element as it arrives, in place of the one drawn at that place by the
    last poll, so the card is drawn to show no mixture of two states meanwhile: everything is
    computed first; the card always has the same slots in the same order (an empty one where
    there is nothing), so no slot ever holds another kind of thing; the Cancel slot comes before
    the header, so a header saying "completed" never sits beside the running run's Cancel; and
    where the place showed another run, or this run in another status, its header stays blank
    until the rest is drawn, so no header ever names a run above another run's numbers or says
    "completed" above a live chart (seen in Chromium, before this, for 1-3 s when a run ended;
    tests/test_browser_train.py)."""
    details = " · ".join(filter(None, [run.config.get("loss"), run.phase, run.device]))
    header = f"**Run #{run.id}** {STATUS_ICON.get(run.status, '')} {run.status} · {details}"
    times = timing(run)
    curve = loss_curve(run, epochs or []) if run.active and run.kind == "train" else None
    notice = _result(run)
    with st.container(border=True, key=f"run-card-{place}"):
        head, button = st.columns([5, 1])
        if not run.active or not can("cancel", owner=run.created_by):
            button.empty()
        elif button.button("Cancel", key=f"cancel-{run.id}"):
            try:
                cancel_run(engine(), run.id)
            except (ValueError, StorageError) as exc:  # not theirs (core.access), or a locked database  # the database stayed locked (a stalled worker): a sentence
                notice = (st.error, str(exc))
            else:
                flash(f"Asked run #{run.id} to stop.", "info")  # shown once the run has ended and the page reruns
        title = head.empty() if shown_here != (run.id, run.status) else None  # blank until the rest is drawn
        if title is None:
            head.markdown(header)
        fraction = run.step / run.total_steps if run.total_steps else 0.0
        progress = run.waiting if run.status == "queued" and run.waiting else \
            f"epoch {run.epoch} · step {run.step}/{run.total_steps or '?'}"
        st.progress(min(1.0, fraction), text=progress)
        if times is not None:
            st.caption(times)
        else:
            st.empty()  # (one element in each slot, drawn once per poll: a placeholder filled later would blink)
        if run.last_loss is not None:
            counts = run.recent_counts or {}
            # with a cross-batch memory: how many of each category's negatives came from it (core.runs.worker)
            memory = counts.get("from_memory") or {}
            a, b, c, d = st.columns(4)
            a.metric("loss", f"{run.last_loss:.4f}")
            for column, category in ((b, "easy"), (c, "semi-hard"), (d, "hard")):
                column.metric(category, f"{counts.get(category, counts.get(category.replace('-', '_'), 0)):,}",
                              delta=f"{memory.get(category, 0):,} from memory" if memory else None,
                              delta_color="off", delta_arrow="off",
                              help="triplets of this category in the last batch; with a cross-batch memory, how "
                                   "many of them took their negative from the memory" if memory else None)
        else:
            st.empty()
        if notice is not None:
            show, text = notice
            show(text)
        else:
            st.empty()
        if curve is not None:
            st.altair_chart(curve, width="stretch")
        else:
            st.empty()
        if title is not None:
            title.markdown(header)


def steady_places(last: list, before: list) -> list:
    """For each card place, the (run id, status) the last poll and the one before both drew
    there, else None. A card trusts only this to be on the screen: Streamlit drops what a run has
    not yet sent when the next run starts, so one poll's record may name a state whose tail never
    reached the browser (the header of an ended run drawn first above the live chart the dropped
    tail would have removed: tests/test_browser_train.py saw it once under load)."""
    return [shown if place < len(before) and before[place] == shown else None
            for place, shown in enumerate(last)]


def _result(run: RunSnapshot):
    """(st.success / st.error / ..., text) for how the run ended, None while there is nothing to say."""
    done = "Done" if run.seconds is None else f"Done in {run.seconds:.0f} s"  # a loaded run never started
    if run.status == "completed" and run.metrics and "unavailable" in run.metrics:
        return st.success, f"{done} · no retrieval metrics: {run.metrics['unavailable']}"
    if run.status == "completed" and run.metrics:
        sampled = run.metrics.get("sampled_queries")  # a large test set: means over a random sample (core.explore.metrics)
        return st.success, f"{done} · " + " · ".join(
            f"{title} {run.metrics[key]:.3f}" for key, title in METRIC_NAMES.items() if key in run.metrics) + (
            f" · over {sampled:,} sampled queries" if sampled else "")
    if run.reason and run.status != "completed":  # a cancel is no error
        return {"failed": st.error, "interrupted": st.warning}.get(run.status, st.info), run.reason.splitlines()[0]
    return None


def has_epochs(run: RunSnapshot) -> bool:
    """What the Triplets page can show: a training run with at least one stored epoch."""
    return run.kind == "train" and run.stored_epochs > 0


def has_embeddings(run: RunSnapshot) -> bool:
    """What the Explore page can show: a completed run with embeddings."""
    return run.status == "completed" and bool(run.embeddings)


def _say_why_not_shown(wanted: str, instead: str) -> None:
    """The link named a run this page does not list: gone, or not ready for this page."""
    if not wanted.isdigit():
        st.warning(f"The link names run {wanted!r}, which is not a run number; showing {instead} instead.")
        return
    try:
        snapshot = run_snapshot(engine(), int(wanted))
    except LookupError:
        st.error(f"Run {wanted} does not exist: it was deleted, or the link comes from another lab. "
                 f"Showing {instead} instead.")
        return
    st.warning(f"Run {wanted} is {snapshot.status}: it has nothing to show on this page yet. Showing {instead} instead.")


def pick_run(label: str, completed_only: bool = True, kind: Optional[str] = None, key: str = "run",
             shows: Callable[[RunSnapshot], bool] = has_embeddings) -> Optional[int]:
    """A select box of runs, newest first. It opens on the run the URL names (`?run=N`) when that is
    listed, else on the newest run the page can show (`shows`), so an interrupted run with nothing
    stored is never the first thing a page offers. The choice goes back into the URL."""
    runs = run_snapshots(engine(), completed_only, kind)
    options = {run.id: run_label(run) for run in runs}
    showable = [run.id for run in runs if shows(run)]
    if not options:
        return None
    ids = list(options)
    wanted = st.query_params.get("run")
    if wanted and wanted.isdigit() and int(wanted) in ids:
        index = ids.index(int(wanted))
    else:
        index = ids.index(showable[0]) if showable else 0
        if wanted and key not in st.session_state:  # a link's run that this page cannot show: say so
            _say_why_not_shown(wanted, options[ids[index]])
    run_id = st.selectbox(label, ids, index=index, format_func=options.get, key=key)
    st.query_params["run"] = str(run_id)
    return run_id
