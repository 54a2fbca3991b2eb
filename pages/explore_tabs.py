"""The Explore page's tabs: where the encoder fails (failing queries, confusion, label errors),
search by images, exports."""
import numpy as np
import streamlit as st

from core.data.images import ImageRejected
from core.explore.failures import confusion_normalised, describe_map_at_r, label_errors, worst_queries
from core.explore.service import PLACE_K, label_error_rows, query_marks, query_rows, search_by_images
from pages import explore_data as data
from pages import explore_views as views
from pages.common import engine


def failure_tabs(tabs, stats, labelled: bool, among: np.ndarray | None, run_key: str, run_id: int,
                 stats_path: str | None, classes: list[str], pixels, state_key: str,
                 unavailable: str | None = None) -> None:
    """tabs: the failing queries', confusion's and label errors' tabs; among: the dataset positions
    the failing queries and label errors are limited to (None: all); unavailable: why the run has
    no retrieval metrics (one class, or no class with two images), when it has none: then there is
    nothing to compare either, and a per-class Precision@1 of 1.000 would contradict the header."""
    failing, confusion_tab, errors_tab = tabs
    if unavailable and labelled:
        for tab in tabs:
            tab.info(f"Nothing to compare in this run: {unavailable}.")
        return
    if stats is None or not labelled:
        why = ("this dataset has no labels, so no query can fail" if not labelled
               else "the run's statistics are not computed yet (see above)")
        for tab in tabs:
            tab.info(f"Nothing to show: {why}.")
        return
    with failing:
        st.caption("The evaluated queries with the lowest average precision (as MAP@R counts it), each with its "
                   "top results among the evaluated images: ✓ its own class, ✗ another.")
        n_rows = st.slider("Queries", 5, 50, 10, key=f"{state_key}-nfail")
        worst = worst_queries(stats, n_rows, among=among)
        if len(worst) == 0:
            st.info("No evaluated query in the selected region." if among is not None else "No evaluated queries.")
        else:
            select_button(f"Select these {len(worst)} queries", [int(p) for p in worst], state_key, "fail")
            views.failing_queries(query_rows(data.ranker(run_key, run_id, stats_path), stats, worst, 8, classes),
                                  pixels, state_key)
    with confusion_tab:
        st.caption(f"For each query class (rows), the classes of its top {stats.neighbours.shape[1]} results among "
                   "the evaluated images (columns), as a share of them; and each class's own Precision@1 and MAP@R. "
                   "Over every evaluated query, whatever the selection. " + describe_map_at_r(stats))
        views.confusion(stats.confusion, confusion_normalised(stats), classes, stats.per_class,
                        stats.neighbours.shape[1])
    with errors_tab:
        st.caption(f"Images whose {stats.neighbours.shape[1]} nearest neighbours mostly carry one other label, "
                   "most convincing first: candidates for a wrong label (or for a class the encoder cannot tell apart).")
        threshold = st.slider("At least this share of neighbours agreeing on another label", 0.5, 1.0, 0.7, 0.05,
                              key=f"{state_key}-share")
        errors = label_errors(stats, 20, min_share=threshold, among=among)
        if not errors:
            st.info("No image passes that threshold" + (" in the selected region." if among is not None else "."))
        else:
            select_button(f"Select these {len(errors)} images", [int(e["position"]) for e in errors], state_key, "errors")
            views.label_errors(label_error_rows(stats, errors, 8, classes), pixels, state_key)


def select_button(label: str, positions: list[int], state_key: str, name: str) -> None:
    """A button that makes these images the page's selection: the map lights them, and the
    region's section above offers to relabel, exclude or tag them (a new dataset version)."""
    def select() -> None:
        st.session_state[f"{state_key}-point"], st.session_state[f"{state_key}-focus"] = None, None
        st.session_state[f"{state_key}-region"] = sorted(positions)
        st.session_state[f"{state_key}-filter"] = False  # the list stays whole: it is the selection now

    st.button(label, key=f"{state_key}-select-{name}", on_click=select,
              help="Select them on the map; then fix them (relabel, exclude, tag) in the region's section above.")


def show_marks(state_key: str, placed: dict) -> None:
    """Put the searched images on the map (drawn above this tab): a rerun when they changed."""
    if st.session_state.get(f"{state_key}-marks", {}) != placed:
        st.session_state[f"{state_key}-marks"] = placed
        st.rerun()


def search_tab(run_key: str, run_id: int, pixels, most: int, state_key: str,
               maps: list[tuple[str, str | None]]) -> None:
    """Search the run's images with uploaded ones; most: the most results per image the dataset
    allows; maps: the (method, path) of the run's map, where the searched images are placed."""
    index = data.run_index(run_key, run_id).index
    if index.kind == "exact":
        st.caption(f"Exact search over {index.size:,} images.")
    else:
        st.caption(f"Approximate search over {index.size:,} images: {index.describe()}.")
    uploads = st.file_uploader("Images to search with (one or several)", type=["png", "jpg", "jpeg", "webp", "bmp", "gif"],
                               accept_multiple_files=True, key=f"{state_key}-uploads")
    if not uploads:
        show_marks(state_key, {})
        return
    k_search = st.slider("Results per image", 1, most, min(8, most), key=f"{state_key}-ksearch") if most > 1 else 1
    try:
        # the map places each image among its PLACE_K nearest, whatever number of results is shown
        each, together = search_by_images(engine(), run_id, [(u.getvalue(), u.name) for u in uploads],
                                          min(max(k_search, PLACE_K), most), data.run_index(run_key, run_id))
    except (ImageRejected, LookupError, ValueError) as exc:
        st.error(str(exc))
        show_marks(state_key, {})
        return
    placed = {}
    for method, path in maps:  # the map shown and the one it will become
        placed[method] = query_marks(data.coordinates(run_key, run_id, method, path), [u.name for u in uploads], each)
    each = [hits[:k_search] for hits in each]
    together = None if together is None else together[:k_search]
    st.caption("Each image is on the map above too, in black, among its nearest images.")
    show_marks(state_key, placed)
    if together is not None:
        st.markdown(f"**All {len(uploads)} together** (the mean of their embeddings)")
        views.hits_row(pixels, together)
    for upload, hits in zip(uploads, each):
        st.markdown(f"**{upload.name}**")
        views.hits_row(pixels, hits)


def export_tab(run_id: int) -> None:
    views.export_buttons(engine(), run_id)
