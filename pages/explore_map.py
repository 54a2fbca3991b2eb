"""The Explore page's maps: the run's map (UMAP, or PCA while UMAP computes) and its test images
across epochs. What the person does on a map becomes the page's selection, kept in the session
under `state_key` (point, region, focus, nonce)."""
import streamlit as st

from core.explore.map_files import COLOURINGS, MINING_COLOURINGS
from core.training.tally_files import mining_epochs
from pages import explore_data as data
from pages.map import embedding_map


def take_event(event, state_key: str, image_of=None) -> None:
    """What the person did on a map becomes the page's selection; image_of turns the map's point
    numbers into dataset positions (the map across epochs shows a subset)."""
    if not event or event.get("nonce") == st.session_state[f"{state_key}-nonce"]:
        return
    image_of = image_of if image_of is not None else (lambda i: int(i))
    st.session_state[f"{state_key}-nonce"] = event.get("nonce")
    st.session_state[f"{state_key}-focus"] = None
    if event["type"] == "click":
        st.session_state[f"{state_key}-point"], st.session_state[f"{state_key}-region"] = image_of(event["point"]), None
    elif event["type"] == "region":
        st.session_state[f"{state_key}-point"] = None
        st.session_state[f"{state_key}-region"] = sorted(image_of(i) for i in event["points"])
    else:
        st.session_state[f"{state_key}-point"] = st.session_state[f"{state_key}-region"] = None


def epochs_view(run_key: str, run_id: int, evolution_at: str | None, state_key: str, shown: list[int]) -> None:
    """The map across epochs, played in the browser; shown: the selected dataset positions."""
    st.subheader("Across epochs")
    if evolution_at is None:
        st.info("The map across epochs is computed after the UMAP map, in the same process (see above).")
        return
    try:
        epoch_arguments, probe = data.epochs_payload(run_key, run_id, evolution_at)
    except (LookupError, ValueError, OSError) as exc:  # a stored file gone or damaged
        st.error(f"The map across epochs cannot be shown: {exc}. Compute it again: "
                 f"`python -m core project --run {run_id}`.")
        return
    frames = epoch_arguments["frames"]
    st.caption(f"The same {len(probe):,} images after each of {len(frames)} epochs; each epoch's map starts "
               "from the next one's and is aligned to it, so a point moves as far as its neighbourhood "
               "changed. Play, or drag the slider; Precision@1 is measured on these images at that epoch.")
    point_of = {int(position): i for i, position in enumerate(probe)}
    focus = st.session_state[f"{state_key}-focus"]
    event = embedding_map(
        **epoch_arguments, selected=[point_of[p] for p in shown if p in point_of],
        focus=dict(focus, point=point_of[focus["point"]]) if focus and focus["point"] in point_of else None,
        key=f"epochs-{run_key}")
    take_event(event, state_key, lambda i: int(probe[int(i)]))


def map_view(run_key: str, run_id: int, method: str, path: str | None, stats_path: str | None, labelled: bool,
             state_key: str, shown: list[int]) -> None:
    """The run's map, coloured as the person picks; the page stops when its files cannot be read."""
    st.subheader("Map (UMAP)" if method == "umap" else "Map (PCA preview while UMAP computes)")
    mined = bool(mining_epochs(run_id))  # a training run's per-image mining counts (not an embed run's)
    available = [name for name in COLOURINGS
                 if (stats_path or name not in ("nn", "ap")) and (mined or name not in MINING_COLOURINGS)]
    if not labelled:
        available = [name for name in available if name not in ("label", "nn", "ap")] or ["split"]
    colour = st.segmented_control("Colour by", available, default=available[0], format_func=COLOURINGS.get,
                                  key=f"{state_key}-colour") or available[0]
    try:
        arguments = data.payload(run_key, run_id, method, path, colour, stats_path)
    except (LookupError, ValueError, OSError) as exc:  # a map file gone or damaged
        st.error(f"The map cannot be shown: {exc}. Compute it again: `python -m core project --run {run_id}`.")
        st.stop()
    take_event(embedding_map(**arguments, focus=st.session_state[f"{state_key}-focus"], selected=shown,
                             key=f"map-{run_key}"), state_key)
