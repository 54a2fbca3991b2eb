"""The Explore page's maps: the run's map (UMAP, or PCA while UMAP computes) and its test images
across epochs. What the person does on a map becomes the page's selection, kept in the session
under `state_key` (point, region, focus, nonce)."""
import base64
import zlib

import numpy as np
import streamlit as st

from core.explore.map_files import COLOURINGS, MINING_COLOURINGS
from core.training.tally_files import mining_epochs
from pages import explore_data as data
from pages.common import kept_in_url
from pages.map import embedding_map


REGION_IN_URL = 8000  # characters: a longer region is left out of the page's link


def region_text(positions: list[int]) -> str:
    """Sorted positions for a link, as ranges ([1, 2, 3, 7, 9, 10] -> "1-3.7.9-10") or, when
    shorter (a region scattered over the dataset's order), as "z" and the base64url of the
    zlib-packed gaps between them (about 1.5 characters a position for 500 of 70,000)."""
    ranges = _ranges(positions)
    if len(ranges) < 64:
        return ranges
    gaps = np.diff(np.array(sorted(set(int(p) for p in positions)), dtype=np.int64), prepend=-1)
    packed = "z" + base64.urlsafe_b64encode(zlib.compress(_varints(gaps), 9)).decode().rstrip("=")
    return packed if len(packed) < len(ranges) else ranges


def _varints(values) -> bytes:
    out = bytearray()
    for value in values:
        value = int(value)
        while True:
            low, value = value & 0x7F, value >> 7
            out.append(low | (0x80 if value else 0))
            if not value:
                break
    return bytes(out)


def _unpack(text: str, n: int) -> list[int]:
    """A packed region's positions; a link that unpacks past 5 bytes a dataset image is refused."""
    inflate = zlib.decompressobj()
    data = inflate.decompress(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)), 5 * n + 16)
    if inflate.unconsumed_tail:
        raise ValueError("a packed region unpacks to more than the dataset holds")
    if not inflate.eof or not data:
        raise ValueError("a packed region is cut short or empty")
    values, value, shift = [], 0, 0
    for byte in data:
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            values.append(value)
            value, shift = 0, 0
    if shift:
        raise ValueError("a packed region ends inside a number")
    return (np.cumsum(np.array(values, dtype=np.int64)) - 1).tolist() if values else []


def _ranges(positions: list[int]) -> str:
    parts, start, previous = [], None, None
    for position in sorted(set(int(p) for p in positions)):
        if start is None:
            start = previous = position
        elif position == previous + 1:
            previous = position
        else:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
            start = previous = position
    if start is not None:
        parts.append(str(start) if start == previous else f"{start}-{previous}")
    return ".".join(parts)


def parse_region(text: str, n: int) -> list[int]:
    """region_text's positions below n; ValueError for anything else."""
    if text.startswith("z"):
        try:
            positions = _unpack(text[1:], n)
        except (zlib.error, ValueError, TypeError) as exc:
            raise ValueError(f"the packed region cannot be read: {exc}") from None
        gaps_ok = len(positions) == len(set(positions))
        if not gaps_ok or any(p < 0 or p >= n for p in positions) or len(positions) > n:
            raise ValueError("the packed region names positions outside the dataset")
        return sorted(positions)
    found: set[int] = set()
    for part in text.split("."):
        low, dash, high = part.partition("-")
        first, last = int(low), int(high if dash else low)
        if not 0 <= first <= last < n or last - first > n:
            raise ValueError(f"{part!r} is not a range of image positions")
        found.update(range(first, last + 1))
    return sorted(found)


def seed_from_link(state_key: str, n: int) -> None:
    """A new session opens on the selection and epoch its link names (?point=, ?region=, ?epoch=);
    anything malformed in the link is dropped, never raised."""
    if f"{state_key}-nonce" in st.session_state:
        return
    for suffix, default in (("point", None), ("region", None), ("focus", None), ("nonce", None), ("epoch", None)):
        st.session_state[f"{state_key}-{suffix}"] = default
    params = st.query_params
    try:
        if params.get("point", "").isdigit() and int(params["point"]) < n:
            st.session_state[f"{state_key}-point"] = int(params["point"])
        elif params.get("region"):
            st.session_state[f"{state_key}-region"] = parse_region(params["region"], n) or None
        if params.get("epoch", "").isdigit():
            st.session_state[f"{state_key}-epoch"] = int(params["epoch"])
    except ValueError:
        pass


def selection_to_link(state_key: str) -> None:
    """The page's selection and epoch back into its link, so the view can be shared."""
    point, region = st.session_state[f"{state_key}-point"], st.session_state[f"{state_key}-region"]
    epoch = st.session_state[f"{state_key}-epoch"]
    wanted = {"point": None if point is None else str(point),
              "region": region_text(region) if region else None,
              "epoch": None if epoch is None else str(epoch)}
    if wanted["region"] is not None and len(wanted["region"]) > REGION_IN_URL:
        wanted["region"] = None
    for name, value in wanted.items():
        if value is None:
            if name in st.query_params:
                del st.query_params[name]
        elif st.query_params.get(name) != value:
            st.query_params[name] = value


def take_pending(state_key: str, run_key: str, run_id: int, view: str, evolution_at: str | None) -> None:
    """The maps' newest events, taken before the page draws anything: the page's selection must be
    the one the person just made when the map is drawn with it (taken after the map, it drew the
    previous selection while the page listed the new one)."""
    if view == "epochs":
        if evolution_at is not None and st.session_state.get(f"epochs-{run_key}"):
            try:
                _, probe = data.epochs_payload(run_key, run_id, evolution_at)
            except (LookupError, ValueError, OSError):
                return
            take_event(st.session_state.get(f"epochs-{run_key}"), state_key, lambda i: int(probe[int(i)]))
    else:
        take_event(st.session_state.get(f"map-{run_key}"), state_key)


def take_event(event, state_key: str, image_of=None) -> None:
    """What the person did on a map becomes the page's selection; image_of turns the map's point
    numbers into dataset positions (the map across epochs shows a subset). A frame event keeps the
    selection and notes the epoch."""
    if not event or event.get("nonce") == st.session_state[f"{state_key}-nonce"]:
        return
    image_of = image_of if image_of is not None else (lambda i: int(i))
    st.session_state[f"{state_key}-nonce"] = event.get("nonce")
    if event["type"] == "frame":
        st.session_state[f"{state_key}-epoch"] = int(event["epoch"])
        return
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
        frame=st.session_state[f"{state_key}-epoch"], key=f"epochs-{run_key}")
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
    colour = st.segmented_control("Colour by", available, format_func=COLOURINGS.get,
                                  key=kept_in_url("colour", available[0], available)) or available[0]
    try:
        arguments = data.payload(run_key, run_id, method, path, colour, stats_path)
    except (LookupError, ValueError, OSError) as exc:  # a map file gone or damaged
        st.error(f"The map cannot be shown: {exc}. Compute it again: `python -m core project --run {run_id}`.")
        st.stop()
    marks = st.session_state.get(f"{state_key}-marks", {}).get(method) or []
    take_event(embedding_map(**arguments, focus=st.session_state[f"{state_key}-focus"], selected=shown,
                             marks=marks, key=f"map-{run_key}"), state_key)
