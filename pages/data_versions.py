"""The Data page's versions of a dataset (core.data.versions): what each changed, a form that makes
a new one from image ids, "Train again on this version", and, apart from it, deleting one."""
import streamlit as st

from core.data.versions import VersionInfo, delete_version, list_versions, make_version, parse_edit_text
from core.runs.overview import run_snapshots
from core.runs.retrain import retrain_on_version
from pages.signin import can, why_not
from pages.common import engine, flash, show_flash
from storage.settings import StorageError

SHOWN_EDITS = 200  # rows of a version's edits listed on the page (the command line lists them all)


def versions_section(dataset_id: int, dataset_name: str) -> int:
    """The versions of the dataset and the forms that change them; returns the version the
    gallery below shows (chosen here, the newest by default)."""
    st.subheader("Versions")
    show_flash()
    infos = list_versions(engine(), dataset_id)
    st.caption("Version 1 is the images as imported; each later version is its parent plus its edits (the pixels "
               "are never copied). A run keeps the version it trained on. `--dataset NAME@VERSION` names one on the "
               "command line; a bare name is the newest.")
    st.dataframe([_row(info) for info in infos], hide_index=True, width="stretch")
    for info in infos[1:]:
        if any(info.edits.counts.values()):
            with st.expander(f"What version {info.version} changed ({info.edits.summary()})"):
                st.dataframe(_edit_rows(info)[:SHOWN_EDITS], hide_index=True, width="stretch")
    numbers = [info.version for info in infos]
    key = f"shown-version-{dataset_id}"
    # the newest, once the form made a version or the one shown was deleted (the widget's own choice otherwise)
    if st.session_state.pop("_made_version", None) is not None or st.session_state.get(key) not in numbers:
        st.session_state.pop(key, None)
    shown = st.selectbox("Show version", numbers, index=len(numbers) - 1, key=key)
    if can("edit"):  # a viewer sees the versions, not the forms (the services refuse them too)
        with st.expander("Edit: make a new version"):
            edit_form(dataset_id, numbers)
        with st.expander("Train again on a version"):
            retrain_form(dataset_id, dataset_name, numbers)
        with st.expander("Delete a version"):  # apart from training again, behind a confirmation
            delete_form(dataset_id, dataset_name, numbers)
    return shown


def _row(info: VersionInfo) -> dict:
    return {"version": info.version, "from": info.parent, "changed": info.edits.summary(), "images": info.n_images,
            "runs": ", ".join(f"#{r}" for r in info.runs), "note": info.note or "",
            "warnings": " · ".join(info.warnings)}


def _edit_rows(info: VersionInfo) -> list[dict]:
    return ([{"image": p, "edit": "relabel", "was": before or "", "now": after}
             for p, before, after in info.edits.relabelled]
            + [{"image": p, "edit": "exclude", "was": "", "now": ""} for p in info.edits.excluded]
            + [{"image": p, "edit": "tag", "was": "", "now": text} for p, text in info.edits.tagged])


def edit_form(dataset_id: int, numbers: list[int]) -> None:
    """Relabel, exclude or tag images by id (the position the gallery, the search and the exports show)."""
    with st.form(f"edit-{dataset_id}"):
        parent = st.selectbox("Edit version", numbers, index=len(numbers) - 1)
        relabel = st.text_area("Relabel", placeholder="12=Coat, 15=Bag", help="ID=LABEL, separated by commas or lines")
        exclude = st.text_input("Exclude", placeholder="7 8 31", help="image ids, separated by spaces or commas")
        tag = st.text_area("Tag", placeholder="12=blurry", help="ID=TAG, one per line")
        note = st.text_input("Note", placeholder="what this version fixes")
        submitted = st.form_submit_button("Make the version")
    if not submitted:
        return
    try:
        relabelled, excluded, tags = parse_edit_text(relabel, exclude, tag)
        number = make_version(engine(), dataset_id, relabelled, excluded, tags, note, parent=parent)
    except (ValueError, LookupError, StorageError) as exc:
        st.error(f"Nothing was stored: {exc}")
        return
    flash(f"Made version {number}.")
    st.session_state["_made_version"] = number
    st.rerun()


def retrain_form(dataset_id: int, dataset_name: str, numbers: list[int]) -> None:
    """A run of this dataset started again with its settings on a chosen version."""
    runs = {run.id: f"#{run.id} {run.dataset_ref} · {run.config.get('loss', 'loaded encoder')} · {run.status}"
            for run in run_snapshots(engine()) if run.dataset_id == dataset_id}
    left, right = st.columns(2)
    source = left.selectbox("Run", list(runs), format_func=runs.get, key=f"again-run-{dataset_id}")
    version = right.selectbox("On version", numbers, index=len(numbers) - 1, key=f"again-version-{dataset_id}")
    if not runs:
        st.caption("No run of this dataset yet.")
    if st.button("Train again on this version", disabled=source is None, type="primary"):
        try:
            new_run = retrain_on_version(engine(), source, version)
        except (ValueError, LookupError, StorageError) as exc:
            st.error(str(exc))
        else:
            st.session_state["watching"] = new_run
            flash(f"Run #{new_run} trains again with run #{source}'s settings on {dataset_name}@{version}; "
                  f"the Train page follows it. Once it completes, [compare the two](/compare?a={source}&b={new_run}).")
            st.rerun()


def delete_form(dataset_id: int, dataset_name: str, numbers: list[int]) -> None:
    """A version deleted once its deletion is confirmed (core.data.versions.delete_version refuses
    version 1, one a run uses and one another version edits, with a sentence)."""
    if len(numbers) < 2:
        st.caption("Only version 1, the images as imported, which is never deleted.")
        return
    st.caption("A version a run uses, or that another version edits, cannot be deleted; version 1 never.")
    allowed = can("delete")
    doomed = st.selectbox("Version", numbers[1:], index=len(numbers) - 2, key=f"delete-version-{dataset_id}")  # the newest
    confirm = st.checkbox(f"Yes, delete version {doomed} of {dataset_name} and its edits", disabled=not allowed,
                          key=f"delete-version-confirm-{dataset_id}-{doomed}", help=None if allowed else why_not("delete"))
    if st.button("Delete this version", disabled=not (confirm and allowed)):
        try:
            delete_version(engine(), dataset_id, doomed)
        except (ValueError, LookupError, StorageError) as exc:
            st.error(str(exc))
        else:
            flash(f"Deleted version {doomed}.", "info")
            st.rerun()
