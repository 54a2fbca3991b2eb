"""The Explore page's sections below the map: galleries of hits, failing queries, the confusion
matrix, likely label errors, search by images and exports. Each reads what core/ stored or cached."""
from __future__ import annotations

import tempfile
from typing import Optional
from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from core.data.display import enlarge
from core.explore.service import find_images
from pages.common import engine

THUMB = 80


def focus_on(state_key: str, position: int) -> None:
    """Select a point and move the map to it (a button's callback); the nonce makes the map
    move again when the same point is shown twice."""
    import time

    st.session_state[f"{state_key}-point"] = int(position)
    st.session_state[f"{state_key}-focus"] = {"point": int(position), "nonce": time.time()}
    st.session_state[f"{state_key}-region"] = None


def hits_row(pixels, hits: list[dict], mark_wrong: bool = False) -> None:
    captions = []
    for h in hits:
        name = h["label"] or f"#{h['position']}"
        mark = ("✓ " if h.get("correct", True) else "✗ ") if mark_wrong else ""
        captions.append(f"{mark}{name} · d={h['distance']:.3f}")
    st.image([enlarge(pixels[h["position"]], THUMB) for h in hits], width=THUMB, caption=captions)


def gallery(pixels, positions, labels, classes, limit: int = 48) -> None:
    shown = list(positions[:limit])
    st.image([enlarge(pixels[i], THUMB) for i in shown], width=THUMB,
             caption=[f"#{i} · {classes[labels[i]] if labels[i] is not None else 'unlabeled'}" for i in shown])


def region_summary(pixels, region: list[int], labels, classes) -> None:
    counts = pd.Series([classes[labels[i]] if labels[i] is not None else "unlabeled" for i in region]).value_counts()
    left, right = st.columns([1, 3])
    left.dataframe(counts.rename_axis("class").reset_index(name="images"), hide_index=True, width="stretch")
    with right:
        gallery(pixels, region, labels, classes)
        if len(region) > 48:
            st.caption(f"The first 48 of {len(region):,} selected images.")


def failing_queries(rows: list[dict], pixels, state_key: str) -> None:
    for row in rows:
        query, results = st.columns([1, 6])
        query.image(enlarge(pixels[row["position"]], THUMB), width=THUMB,
                    caption=f"#{row['position']} · {row['label']}")
        query.caption(f"AP {row['ap']:.3f}")
        query.button("Show on map", key=f"{state_key}-fq-{row['position']}", on_click=focus_on,
                     args=(state_key, row["position"]))
        with results:
            hits_row(pixels, row["hits"], mark_wrong=True)


def label_errors(rows: list[dict], pixels, state_key: str) -> None:
    for row in rows:
        query, results = st.columns([1, 6])
        query.image(enlarge(pixels[row["position"]], THUMB), width=THUMB, caption=f"#{row['position']}")
        query.markdown(f"labelled **{row['label_name']}**, looks like **{row['suspect_name']}** "
                       f"({row['share']:.0%} of its neighbours)")
        query.button("Show on map", key=f"{state_key}-le-{row['position']}", on_click=focus_on,
                     args=(state_key, row["position"]))
        with results:
            hits_row(pixels, row["hits"], mark_wrong=True)


HEATMAP_CLASSES = 40  # past this many classes a heatmap is unreadable: the most confused pairs instead


def confusion(matrix: np.ndarray, normalised: np.ndarray, classes: list[str], per_class: list[dict], k: int) -> None:
    n = min(len(classes), matrix.shape[0])  # the matrix stops at the last class that has images
    if n > HEATMAP_CLASSES:
        off = normalised[:n, :n].copy()
        np.fill_diagonal(off, 0)
        pairs = np.dstack(np.unravel_index(np.argsort(-off, axis=None)[:30], off.shape))[0]
        st.caption(f"{n} classes: the 30 most confused pairs instead of a {n} × {n} heatmap.")
        st.dataframe(pd.DataFrame([{"query class": classes[a], "result class": classes[b],
                                    "share of results": float(off[a, b]), "results": int(matrix[a, b])}
                                   for a, b in pairs if off[a, b] > 0]), hide_index=True)
    else:
        _heatmap(matrix, normalised, classes, n, k)
    table = pd.DataFrame([{"class": classes[row["class"]], "queries": row["n_queries"],
                           "Precision@1": row["precision_at_1"], "MAP@R": row["map_at_r"]} for row in per_class])
    st.dataframe(table, hide_index=True, width="content",
                 column_config={"Precision@1": st.column_config.NumberColumn(format="%.3f"),
                                "MAP@R": st.column_config.NumberColumn(format="%.3f")})


def _heatmap(matrix: np.ndarray, normalised: np.ndarray, classes: list[str], n: int, k: int) -> None:
    frame = pd.DataFrame([
        {"query class": classes[a], "result class": classes[b], "share": float(normalised[a, b]), "results": int(matrix[a, b])}
        for a in range(n) for b in range(n)
    ])
    order = list(classes)
    heat = alt.Chart(frame).mark_rect().encode(
        x=alt.X("result class:N", sort=order, title=f"class of each of the top {k} results"),
        y=alt.Y("query class:N", sort=order, title="query class"),
        # a symbol legend: a gradient one is drawn through an url(#id) that goes blank once the app
        # rewrites the page's address (every widget kept in the link does)
        color=alt.Color("share:Q", scale=alt.Scale(scheme="blues"), title="share of results",
                        legend=alt.Legend(type="symbol", format=".0%")),
        tooltip=["query class", "result class", alt.Tooltip("share:Q", format=".1%"), "results"],
    )
    chart = heat
    if n <= 20:
        chart = heat + heat.mark_text(fontSize=10).encode(
            text=alt.Text("share:Q", format=".0%"),
            color=alt.condition(alt.datum.share > 0.5, alt.value("white"), alt.value("black")))
    side = max(320, min(700, 34 * n + 120))
    st.altair_chart(chart.properties(height=side, width=side), width="content")


def export_buttons(engine, run_id: int) -> None:
    """Three download buttons; each builds its file only when clicked (Streamlit calls `data`),
    with the very call `python -m core export` makes, so the two files hold the same columns."""
    from core.explore.export import export_filename, export_run

    def builder(fmt: str):
        def build() -> bytes:
            with tempfile.TemporaryDirectory() as folder:
                return export_run(engine, run_id, fmt, Path(folder) / export_filename(run_id, fmt)).read_bytes()
        return build

    columns = st.columns(3)
    helps = {
        "parquet": "embeddings, labels, split and map coordinates, with each image's statistics (and a training run's mining counts): one row per image",
        "projector": "tensors.tsv, metadata.tsv, sprite.png and projector_config.pbtxt: unzip and point TensorBoard's projector at it",
        "safetensors": "the encoder's weights with its config in the metadata",
    }
    titles = {"parquet": "Parquet", "projector": "TensorBoard projector (.zip)", "safetensors": "Encoder (safetensors)"}
    for column, fmt in zip(columns, ("parquet", "projector", "safetensors")):
        column.download_button(titles[fmt], data=builder(fmt), file_name=export_filename(run_id, fmt), help=helps[fmt],
                               on_click="ignore", key=f"export-{run_id}-{fmt}", width="stretch")
    st.caption(f"From a terminal: `python -m core export --run {run_id} --format parquet|projector|safetensors --out PATH`")


def find_box(run_id: int, state_key: str) -> None:
    """Find images by class name or file name: what is found becomes the page's selection (the
    map lights it, the views below list it)."""
    with st.form(f"{state_key}-find", border=False):
        text_column, button_column = st.columns([5, 1], vertical_alignment="bottom")
        text = text_column.text_input("Find images by label or file name", key=f"{state_key}-find-text",
                                      placeholder="a class name finds that class; other text, file names holding it")
        if button_column.form_submit_button("Find"):
            found, sentence = find_images(engine(), run_id, text)
            st.session_state[f"{state_key}-find-said"] = sentence
            if found:
                st.session_state[f"{state_key}-point"], st.session_state[f"{state_key}-region"] = None, found
                st.session_state[f"{state_key}-focus"] = None
    if st.session_state.get(f"{state_key}-find-said"):
        st.caption(st.session_state[f"{state_key}-find-said"])


def fix_selection(run_id: int, dataset_id: int, version: int, classes: list[str], positions: list[int],
                  state_key: str) -> None:
    """Relabel, exclude or tag the selected images: a new version of the run's dataset over the
    version the run trained on (core.data.versions.edit_selection); the run keeps its own."""
    from core.data.versions import edit_selection
    from core.runs.retrain import retrain_on_version
    from pages.common import flash

    chosen = "this image" if len(positions) == 1 else f"these {len(positions):,} images"
    with st.expander(f"Fix {chosen}: relabel, exclude or tag {'it' if len(positions) == 1 else 'them'} (a new version)"):
        with st.form(f"{state_key}-fix", border=False):
            left, middle, right = st.columns(3)
            relabel = left.selectbox("Relabel as", [None, *classes], format_func=lambda c: "(keep)" if c is None else c,
                                     key=f"{state_key}-fix-label")
            tag = middle.text_input("Tag", key=f"{state_key}-fix-tag", placeholder="e.g. blurry") or None
            exclude = right.checkbox("Exclude from training and metrics", key=f"{state_key}-fix-exclude")
            note = st.text_input("Note", key=f"{state_key}-fix-note", placeholder="what this version fixes")
            again = st.checkbox(f"Then train again on the new version with run #{run_id}'s settings",
                                key=f"{state_key}-fix-again")
            if st.form_submit_button("Make the new version"):
                try:
                    made = edit_selection(engine(), dataset_id, positions, relabel_to=relabel, exclude=exclude,
                                          tag=tag, note=note, parent=version)
                    said = _made_sentence(dataset_id, made, version, len(positions), relabel, exclude, tag)
                    if again:
                        new_run = retrain_on_version(engine(), run_id, made)
                        st.session_state["watching"] = new_run
                        said += (f" Run #{new_run} trains on it; once it completes, "
                                 f"[compare the two](/compare?a={run_id}&b={new_run}).")
                except (ValueError, LookupError) as exc:
                    st.error(str(exc))
                else:
                    for field in ("label", "tag", "exclude", "note", "again"):  # the next selection starts blank
                        st.session_state.pop(f"{state_key}-fix-{field}", None)
                    flash(said, "warning" if "⚠" in said else "success")
                    st.rerun()


def _made_sentence(dataset_id: int, made: int, parent: int, count: int, relabel: Optional[str], exclude: bool,
                   tag: Optional[str]) -> str:
    """What the fix made, as the command line says it: the version's name, the edit, its warnings."""
    from core.data.versions import describe_version

    info = describe_version(engine(), dataset_id, made)
    edits = [f"relabelled as {relabel}" if relabel else None, "excluded" if exclude else None,
             f"tagged {tag!r}" if tag else None]
    said = (f"Made {info.ref} over version {parent}: {count:,} image{'s' * (count != 1)} "
            f"{' and '.join(e for e in edits if e)}.")
    return said + "".join(f" ⚠ {warning}" for warning in info.warnings)
