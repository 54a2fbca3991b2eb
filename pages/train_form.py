"""The Train page's form for a new run: dataset, encoder, objective with its miner and settings,
optimiser, supervision and batches. Every value lives in the URL (pages.common.kept_in_url), so a
reload or a shared link keeps the form."""
from dataclasses import fields
from typing import Optional

import numpy as np
import streamlit as st

from core.data.display import enlarge
from core.metric import registry
from core.training.augment import augmented_pairs, resolve_supervision
from core.runs.launch import ray_address
from core.training.config import (DEVICES, ENCODERS, FIELD_SETTINGS, FIELD_TITLES as TITLE, MAX_WORKERS, PRECISIONS,
                                  SAMPLERS, SUPERVISION, RunConfig)
from models.widths import AUGMENTS, DEFAULT_WIDTHS, default_augment
from pages.common import between, kept_in_url, parse_bool, pixels_of

SUPERVISION_HELP = {"auto": "labels when the dataset has them (InfoNCE: two views)",
                    "labels": "positives share a class", "self": "two augmented views of an image are the positive pair"}
DIMS, BATCH_SIZES = (16, 32, 64, 128, 256), (32, 64, 128, 256, 512, 1024, 2048)
DEFAULTS = {f.name: f.default for f in fields(RunConfig)}  # the form starts from RunConfig's recipe
ENCODER_TITLES = {"vgg_grid": "VGG grid CNN", "vgg_cnn": "VGG CNN", "small_cnn": "Small CNN", "grid_cnn": "Grid CNN",
                  "resnet18": "ResNet-18"}
ENCODER_HELP = ("VGG grid CNN (the default): three stages of two 3×3 convolutions, the last map kept as a 3×3 "
                "grid; the best in 5 CPU minutes on Fashion-MNIST. VGG CNN: the same stages pooled to one vector, "
                "a little better on 8×8 digits and with the contrastive loss. "
                "Small CNN: four conv blocks pooled to one vector; Grid CNN: "
                "the same, its last map kept as a "
                "3×3 grid (where things are, not only what: a little better with triplet loss on 28×28 "
                "images, worse on 8×8 digits and with the contrastive loss); ResNet-18: deeper, for a GPU.")
AUGMENT_TITLES = {"none": "none", "flip": "mirror half the images", "erase": "blank a square in half the images",
                  "flip+erase": "mirror and blank a square (each in half the images)"}
AUGMENT_CHOICES = ("default", *AUGMENTS)  # "default": the dataset's own (models.widths.default_augment)
WIDTHS = ("default", 16, 24, 32, 48, 64, 96, 128)  # "default": the encoder's own (models.widths)


def parse_width(text: str):
    return text if text == "default" else int(text)


def objective_changed() -> None:
    """A new objective starts from its own miner and settings (core.metric.registry), as a fresh form would."""
    spec = registry.objective(st.session_state["loss"])
    st.session_state["miner"] = spec.default_miner
    for setting in registry.settings_of(spec.name, spec.default_miner):
        st.session_state[setting.name] = setting.default


def setting_widget(column, setting: registry.Setting):
    """The widget of one of the objective's or the miner's settings, kept in the URL under the setting's name."""
    if setting.choices:
        hint = setting.choice_help
        return column.selectbox(setting.title, setting.choices, help=setting.help or None,
                                format_func=lambda v: f"{v}: {hint[v]}" if v in hint else v,
                                key=kept_in_url(setting.name, setting.default, setting.choices))
    # a setting counted in whole numbers (the cross-batch memory's size) reads 256, not 256.00
    whole = all(float(v).is_integer() for v in (setting.low, setting.high, setting.step or 0.5, setting.default))
    return column.number_input(setting.title, setting.low, setting.high, step=setting.step, help=setting.help or None,
                               format="%g" if whole else None,
                               key=kept_in_url(setting.name, setting.default, between(setting.low, setting.high), float))


@st.cache_data(max_entries=8, show_spinner="Augmenting a few images…")
def augmented_preview(dataset_id: int, seed: int) -> np.ndarray:
    """(n, 2, H, W, C) uint8: pairs of views as a self-supervised run makes them."""
    return augmented_pairs(pixels_of(dataset_id), n=6, seed=seed)


def explain_objectives() -> None:
    objectives, miners = registry.objectives(), registry.miners()
    with st.expander("What each objective and miner does"):
        st.markdown("\n".join(f"- **{o.title}**: {o.explanation} Miners: {', '.join(miners[m].title for m in o.miners)}."
                              for o in objectives.values()))
        st.markdown("\n".join(f"- **{m.title}**: {m.explanation}" for m in miners.values()))
        st.caption("Miners over a whole category (all, hard, semi-hard, easy) are computed from the B×B distance "
                   "matrix without listing the B³ triplets; batch-hard and FaceNet pick O(B²) triplets. The Triplets "
                   "page shows what the miner picked and the loss each pick contributed.")


def views_preview(dataset_id: Optional[int]) -> None:
    """Pairs of augmented views of the dataset (None: not imported yet), with a button for others."""
    st.caption("Self-supervised: each image's two augmented views are a positive pair, the rest of the batch "
               "negatives (crop, flip, colour jitter and grayscale for colour images, blur).")
    if dataset_id is None:
        st.caption("A preview of the views appears once the dataset is imported (on its first run).")
        return
    seed = st.session_state.setdefault("preview_seed", 0)
    pairs = augmented_preview(dataset_id, seed)
    for column, pair in zip(st.columns(len(pairs)), pairs):
        views = pair[..., 0] if pair.shape[-1] == 1 else pair  # (2, H, W) grey or (2, H, W, 3)
        column.image([enlarge(view, 72) for view in views], width=72, caption=["view 1", "view 2"])
    if st.button("Other images"):
        st.session_state["preview_seed"] = seed + 1
        st.rerun()


def new_run_form(names: list[str], stored: dict[str, tuple[int, bool]]) -> tuple[dict, Optional[str]]:
    """The form's widgets. names: the datasets offered; stored: (id, labeled) of those imported.
    Returns RunConfig's arguments as the form holds them, and what the run would learn from
    (labels or self; None when the objective cannot learn from this dataset, which is said)."""
    dataset = st.selectbox(TITLE["dataset"], names, key=kept_in_url("dataset", names[0] if names else None, names),
                           help="Built-in sets are imported on first use.")
    c1, c2, c3 = st.columns(3)
    encoder = c1.selectbox(TITLE["encoder"], ENCODERS, key=kept_in_url("encoder", DEFAULTS["encoder"], ENCODERS),
                           format_func=ENCODER_TITLES.get, help=ENCODER_HELP)
    embedding_dim = c2.select_slider(TITLE["embedding_dim"], DIMS,
                                     key=kept_in_url("dim", DEFAULTS["embedding_dim"], DIMS, int))
    device = c3.selectbox(TITLE["device"], DEVICES, key=kept_in_url("device", "auto", DEVICES),
                          help="auto picks CUDA when a GPU is present.")
    # read on every run: an objective or miner registered after this module was imported shows too
    objectives, miners = registry.objectives(), registry.miners()
    loss = c1.selectbox(TITLE["loss"], list(objectives), key=kept_in_url("loss", DEFAULTS["loss"], list(objectives)),
                        format_func=lambda name: objectives[name].title, on_change=objective_changed)
    spec = objectives[loss]
    miner = c2.selectbox(TITLE["miner"], spec.miners, key=kept_in_url("miner", spec.default_miner, spec.miners),
                         format_func=lambda name: miners[name].title)
    # the objective's first setting beside its miner, the others (then the miner's own) on rows of their own
    run_settings = registry.settings_of(loss, miner)
    slots = [c3] + [column for _ in range(len(run_settings) // 3 + 1) for column in st.columns(3)]
    settings = {setting.name: setting_widget(slot, setting) for slot, setting in zip(slots, run_settings)}
    st.caption(f"**{spec.title}** {spec.explanation}  \n**Miner: {miners[miner].title}**, {miners[miner].explanation}")
    explain_objectives()
    c1, c2, c3 = st.columns(3)
    epochs = c1.number_input(TITLE["epochs"], 1, 1000, key=kept_in_url("epochs", DEFAULTS["epochs"], between(1, 1000), int))
    batch_size = c2.select_slider(TITLE["batch_size"], BATCH_SIZES,
                                  key=kept_in_url("batch_size", DEFAULTS["batch_size"], BATCH_SIZES, int))
    lr = c3.number_input(TITLE["lr"], 1e-5, 1.0, format="%.5f",
                         key=kept_in_url("lr", DEFAULTS["lr"], between(1e-5, 1.0), float))

    labeled = stored[dataset][1] if dataset in stored else True  # the built-in sets have labels
    with st.expander("Supervision, batches and speed"):
        s1, s2, s3 = st.columns(3)
        supervision = s1.selectbox(TITLE["supervision"], SUPERVISION, format_func=lambda v: f"{v}: {SUPERVISION_HELP[v]}",
                                   key=kept_in_url("supervision", "auto", SUPERVISION))
        sampler = s2.selectbox(TITLE["sampler"], SAMPLERS, key=kept_in_url("sampler", "pk", SAMPLERS), format_func={
            "pk": "P classes × K images (every anchor has positives)", "random": "random images"}.get)
        samples_per_class = s3.number_input(TITLE["samples_per_class"], 2, 256, help="P = batch size // K classes a batch",
                                            key=kept_in_url("k", DEFAULTS["samples_per_class"], between(2, 256), int))
        precision = s1.selectbox(TITLE["precision"], PRECISIONS, key=kept_in_url("precision", "auto", PRECISIONS),
                                 help="auto: bf16 autocast on a CUDA GPU and on a CPU with bf16 instructions, else "
                                      "float32. The run's embedding and searches use the same.")
        compile_model = s2.checkbox(TITLE["compile"],
                                    key=kept_in_url("compile", False, (True, False), parse_bool),
                                    help="faster steps on a GPU after a compile of a minute")
        width = s3.selectbox(TITLE["width"], WIDTHS, key=kept_in_url("width", "default", WIDTHS, parse_width),
                             format_func=lambda v: f"default ({DEFAULT_WIDTHS[encoder]})" if v == "default" else str(v),
                             help="channels of the encoder's first stage (later stages double them): wider learns "
                                  "more and costs more a step")
        a1, a2, _ = st.columns(3)
        augment = a1.selectbox(TITLE["augment"], AUGMENT_CHOICES,
                               key=kept_in_url("augment", "default", AUGMENT_CHOICES),
                               format_func=lambda v: f"default ({AUGMENT_TITLES[default_augment(dataset)]})"
                               if v == "default" else AUGMENT_TITLES[v],
                               help="what a batch goes through in a run that learns from labels (two-view runs "
                                    "draw their own views). A run that flips embeds each image as the mean of it "
                                    "and its mirror image. The default mirrors and blanks, but not on digits: a "
                                    "mirrored digit is another glyph.")
        workers = 1
        if ray_address():  # one run on several of the cluster's processes (core.runs.parallel)
            workers = a2.number_input(TITLE["workers"], 1, MAX_WORKERS,
                                      key=kept_in_url("workers", 1, between(1, MAX_WORKERS), int),
                                      help="Ray Train workers training this run data-parallel, each on its share of "
                                           "every batch (the miner and the loss see the whole batch); one CPU, or "
                                           "one GPU for a cuda run, each")
    try:
        learns_from = resolve_supervision(supervision, loss, labeled)
    except ValueError as exc:
        learns_from = None
        st.warning(str(exc))
    if learns_from == "self":
        views_preview(stored[dataset][0] if dataset in stored else None)
    arguments = dict(
        dataset=dataset, encoder=encoder, embedding_dim=embedding_dim, width=None if width == "default" else width,
        loss=loss, miner=miner,
        **{name: value for name, value in settings.items() if name in FIELD_SETTINGS},
        options={name: value for name, value in settings.items() if name not in FIELD_SETTINGS},
        epochs=int(epochs), batch_size=int(batch_size), lr=float(lr), device=device, supervision=supervision,
        sampler=sampler, samples_per_class=int(samples_per_class), augment=None if augment == "default" else augment,
        precision=precision, compile=bool(compile_model),
        workers=int(workers))
    return arguments, learns_from
