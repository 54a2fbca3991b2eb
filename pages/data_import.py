"""The Data page's import form: images, zips of class folders or a whole folder into a new dataset.

A failed import keeps what the person entered (the name, the size, the files), so they can fix one
thing and press Import again; a successful one empties the form for the next dataset. Streamlit's
clear_on_submit would empty it either way, so the form is cleared by giving its widgets new keys
(a new "generation") after a success, and the report is carried over that one rerun."""
import streamlit as st

from core.data.importing import ImportReport, import_uploads
from core.data.ingest import IngestError
from pages.common import engine

GENERATION = "data-import-generation"  # session key: bumped after each successful import
REPORT = "data-import-report"  # session key: the last successful import's report, shown once


def import_form() -> None:
    """The form, then what its last import did."""
    generation = st.session_state.setdefault(GENERATION, 0)
    with st.form(f"import-{generation}", clear_on_submit=False):
        name = st.text_input("Dataset name", placeholder="my-images", key=f"import-name-{generation}")
        size = st.select_slider("Stored image size (pixels)", options=[16, 32, 48, 64, 96, 128], value=64,
                                key=f"import-size-{generation}")
        files = st.file_uploader(
            "Images, or a zip whose top-level folders are class labels",
            type=["png", "jpg", "jpeg", "webp", "bmp", "gif", "zip"], accept_multiple_files=True,
            key=f"import-files-{generation}",
        )
        folder = st.file_uploader("…or a whole folder (subfolders are class labels)", accept_multiple_files="directory",
                                  key=f"import-folder-{generation}")
        submitted = st.form_submit_button("Import")
    report: ImportReport | None = st.session_state.pop(REPORT, None)
    if report is not None:
        show_report(report)
    if not submitted:
        return
    uploads = list(files or []) + list(folder or [])
    if not name.strip():
        st.error("Give the dataset a name.")
        return
    if not uploads:
        st.error("Choose some images, a zip or a folder first.")
        return
    try:
        with st.spinner("Decoding images…"):
            report = import_uploads(engine(), name, [(f.name, f) for f in files or []], size,
                                    folder_files=[(f.name, f) for f in folder or []])
    except (IngestError, ValueError) as exc:
        st.error(f"Nothing was imported. {exc}")
        return
    st.session_state[GENERATION] = generation + 1
    st.session_state[REPORT] = report
    st.rerun()


def show_report(report: ImportReport) -> None:
    st.success(f"Imported {report.n_images} images into “{report.name}” ({len(report.classes)} classes).")
    if report.duplicates:
        st.info(f"{len(report.duplicates)} duplicate images were stored once: {', '.join(report.duplicates[:10])}")
    if report.rejected:
        st.warning("Some files were not imported:\n\n" + "\n".join(f"- **{r.name}**: {r.reason}" for r in report.rejected))
