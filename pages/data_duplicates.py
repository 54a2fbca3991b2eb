"""The Data page's Duplicates section: exact and near copies of a dataset's images, by their pixels
or by a run's embeddings, and the test images that have a copy in the training split.

A small dataset is searched on the click (digits' 1,797 images: well under a second); a larger one
by a process of its own (Fashion-MNIST's 70,000: seconds of CPU), which this section polls until its
finding is stored. Stored findings are read back at once."""
from __future__ import annotations

import streamlit as st

from core.data.display import enlarge
from core.data.duplicates import EXCLUSIONS, DuplicateReport, Group, check_threshold, positions_to_exclude
from core.explore import duplicates as service
from pages.common import engine, flash
from pages.signin import can
from storage.settings import StorageError

INLINE_IMAGES = 5000  # up to this many images, the search runs on the click
GROUPS_PER_PAGE = 12
THUMB = 72
FILTERS = {"all": "All groups", "leaks": "Train and test", "labels": "Labels disagree"}


def duplicates_section(dataset_id: int, n_images: int, pixels) -> None:
    runs = service.runs_with_embeddings(engine(), dataset_id)
    left, right = st.columns([2, 1])
    measure = left.selectbox(
        "Compare by", ["pixels"] + runs, key=f"dup-measure-{dataset_id}",
        format_func=lambda r: "Pixels (a descriptor that ignores a one-pixel shift and JPEG re-encoding)"
        if r == "pixels" else f"Run #{r}'s embeddings",
        help="Pixels: a blurred 16×16 grey image, mean-centred and normalised, compared at every one-pixel shift. "
             "A run: the distance between its normalised embeddings, so what the encoder cannot tell apart.")
    run_id = None if measure == "pixels" else measure
    threshold = right.number_input(
        "Threshold (distance)", min_value=0.001, max_value=2.0, step=0.005, format="%.3f",
        value=service.default_threshold(run_id), key=f"dup-threshold-{dataset_id}-{run_id}",
        help="Near copies are pairs at most this far apart, joined into groups. Pixels: a JPEG copy at quality 90 "
             "lies within 0.042 on Fashion-MNIST, and 88 pairs of its 70,000 images within 0.05.")
    try:
        threshold = check_threshold(threshold)
        chosen = service.target(engine(), dataset_id, run_id)
    except (LookupError, ValueError) as exc:
        st.warning(str(exc))
        return
    found = _stored(chosen, threshold)
    if found is None:
        _search(chosen, threshold, n_images)
        return
    _show(found, pixels)


@st.cache_resource(max_entries=4)
def _cached(source: str, threshold: float, version: int, _chosen: service.Target) -> DuplicateReport:
    """The report of a stored finding (read once: 70,000 image rows), keyed by what it was computed
    from; LookupError, which is not cached, while there is none."""
    found = service.stored_report(engine(), _chosen, threshold)
    if found is None:
        raise LookupError("not stored yet")
    return found


def _stored(chosen: service.Target, threshold: float) -> DuplicateReport | None:
    try:
        return _cached(chosen.source, threshold, chosen.version, chosen)
    except LookupError:
        return None


def _search(chosen: service.Target, threshold: float, n_images: int) -> None:
    state = service.job_state(chosen, threshold)
    if state is not None and state.status == "running":
        _wait(chosen, threshold)
        return
    if state is not None:
        st.warning(f"The search failed: {state.reason}")
    if not st.button("Find duplicates", key="dup-find"):
        return
    if n_images <= INLINE_IMAGES:
        try:
            with st.spinner("Looking for duplicates…"):
                service.find_duplicates(engine(), chosen.dataset_id, chosen.run_id, threshold)
        except (LookupError, ValueError) as exc:
            st.error(str(exc))
            return
    else:
        try:
            service.start_job(chosen, threshold)
        except OSError as exc:  # its folder cannot be written (a full disk, a read-only data folder)
            st.error(f"The search cannot start: {exc.strerror or exc} ({exc.filename or 'the data folder'}).")
            return
    st.rerun()


@st.fragment(run_every=1.0)
def _wait(chosen: service.Target, threshold: float) -> None:
    """Polls the search's process; the whole page reruns once its finding is stored."""
    state = service.job_state(chosen, threshold)
    if state is None or state.status != "running":
        st.rerun(scope="app")
    st.info("Looking for duplicates in a process of its own…")


def _show(found: DuplicateReport, pixels) -> None:
    summary = found.summary()
    figures = {"Exact groups": summary["exact_groups"], "Near groups": summary["near_groups"],
               "Test images with a training copy": summary["test_images_with_training_copy"],
               "Groups whose labels disagree": summary["label_disagreeing_groups"]}
    for column, (title, value) in zip(st.columns(len(figures)), figures.items()):
        column.metric(title, f"{value:,}")
    copies, leaks = positions_to_exclude(found, "copies"), positions_to_exclude(found, "leaks")
    st.caption(f"{summary['exact_images']:,} images in exact groups, {summary['near_images']:,} in near groups "
               f"(within {found.threshold:g}), found in {found.seconds:.1f} s. Keeping one image of each group would "
               f"exclude {len(copies):,} images; removing the leaks, {len(leaks):,} test images.")
    if found.excluded:
        st.caption(f"As version {found.version} holds the dataset: its labels, and without the {found.excluded:,} "
                   "images it excludes.")
    _exclude_buttons(found, copies, leaks)
    groups = list(found.exact) + list(found.near)
    if not groups:
        st.success("No two images are copies of each other at this threshold.")
        return
    shown = st.radio("Show", list(FILTERS), format_func=FILTERS.get, horizontal=True, key="dup-filter")
    groups = [g for g in groups if shown == "all" or (g.spans_splits if shown == "leaks" else g.labels_disagree)]
    if not groups:
        st.caption("No group of this kind.")
        return
    pages = (len(groups) + GROUPS_PER_PAGE - 1) // GROUPS_PER_PAGE
    page = st.number_input(f"Page (of {pages})", 1, pages, 1, key=f"dup-page-{shown}") if pages > 1 else 1
    for group in groups[(page - 1) * GROUPS_PER_PAGE: page * GROUPS_PER_PAGE]:
        _group(group, pixels)


def _exclude_buttons(found: DuplicateReport, copies: list[int], leaks: list[int]) -> None:
    """"Exclude duplicates": a new version of the dataset without them (the shown one is kept, and
    every run keeps the version it trained on)."""
    left, right = st.columns(2)
    for column, what, count, title in ((left, "copies", copies, "Exclude the copies, keep one of each"),
                                       (right, "leaks", leaks, "Exclude the test images with a training copy")):
        if column.button(f"{title} ({len(count):,})", key=f"dup-exclude-{what}", disabled=not count or not can("edit"),
                         help=f"Makes a new version of {found.dataset} over version {found.version}, without "
                              f"{EXCLUSIONS[what]}. Version {found.version} stays as it is."):
            try:
                number, excluded = service.exclude_duplicates(engine(), found, what)
            except (LookupError, ValueError, StorageError) as exc:
                column.error(str(exc))
            else:
                st.session_state["_made_version"] = number  # the versions section then shows it
                flash(f"Made version {number} of {found.dataset} ({found.dataset}@{number}): {excluded:,} images "
                      "excluded. Train on it from the Train page, or train a run again on it below.")
                st.rerun()


def _group(group: Group, pixels) -> None:
    notes = [note for note, flag in (("train and test", group.spans_splits), ("labels disagree", group.labels_disagree))
             if flag]
    kind = "Exact copies" if group.kind == "exact" else "Near copies"
    st.markdown(f"**{kind}** · {len(group.members)} images" + "".join(f" · **{n}**" for n in notes))
    members = group.members[:24]
    st.image([enlarge(pixels[m.position], THUMB) for m in members], width=THUMB,
             caption=[f"#{m.position} · {m.label or 'unlabeled'} · {m.split}"
                      + (f" · d={m.distance:.3f}" if group.kind == "near" else "") for m in members])
    if len(group.members) > len(members):
        st.caption(f"The first {len(members)} of {len(group.members)} images.")
