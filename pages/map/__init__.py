"""The Explore map as a Streamlit component: every point in WebGL, hover images, click, box and
lasso selection; optionally several frames of the same points (epochs) with a scrubber and play.
Its browser code is pages/map/frontend/src/main.js, built (npm run build, in pages/map/frontend)
into pages/map/build, which is committed so nothing is built at run time."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import streamlit.components.v1 as components

_map = components.declare_component("embedding_map", path=str(Path(__file__).parent / "build"))


def embedding_map(*, points_url: str, labels_url: str, colour_url: str, n: int, classes: list[str],
                  legend: list[dict], colour_title: str, thumbs: Optional[dict], focus: Optional[dict] = None,
                  selected: Optional[list[int]] = None, height: int = 560, key: str,
                  frames: Optional[list[dict]] = None, positions_url: Optional[str] = None,
                  frame: Optional[int] = None, marks: Optional[list[dict]] = None,
                  link: Optional[dict] = None) -> Optional[dict]:
    """focus: {"point": i, "nonce": t} moves the map to point i (again for a new nonce);
    selected: the points the page has selected (kept through redraws).

    frames: [{"url", "epoch", "precision_at_1"}] (core.explore.service.evolution_payload) makes it a map
    across epochs: a scrubber and a play button switch between the frames' coordinates files
    in the browser, with an animated transition, and say each frame's epoch and Precision@1; it
    opens on the last frame, or on epoch `frame` (a link's). marks: [{"x", "y", "name"}] in the
    map's normalised coordinates (core.explore.service.query_marks): searched images drawn on top
    in a colour of their own. positions_url: a uint32 file naming the dataset image of each point
    (for hover images) when the points are a subset of the dataset.

    link: {"group": name, "url": None or a uint32 file of each point's shared-image index} makes
    maps of one group show each other's hovered image (the Compare page's two maps).

    What the person last did on the map: {"type": "click", "point": i}, {"type": "region",
    "points": [...]}, {"type": "clear"}, {"type": "frame", "epoch": e} (the epoch they settled on
    across epochs), each with a nonce, or None before anything. A click on a legend entry hides its
    points in the browser alone; entries marked "background" are drawn faint and underneath."""
    return _map(points_url=points_url, labels_url=labels_url, colour_url=colour_url, n=n, classes=classes,
                legend=legend, colour_title=colour_title, thumbs=thumbs, focus=focus, selected=selected or [],
                height=height, key=key, default=None, frames=frames, positions_url=positions_url, frame=frame,
                marks=marks or [], link=link)
