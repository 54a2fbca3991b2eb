"""Train: choose the objective, start a worker process, watch its stored progress."""
from dataclasses import fields

import numpy as np
import streamlit as st

from core.training.augment import augmented_pairs, resolve_supervision
from core.metric import registry
from core.training.config import DEVICES, ENCODERS, FIELD_SETTINGS, PRECISIONS, SAMPLERS, SUPERVISION, RunConfig
from core.data.datasets import builtin_names
from core.data.display import enlarge
from core.runs.jobs import create_embedding_run, create_training_run, refresh_liveness, start_worker
from models.checkpoint import CheckpointError
from pages.common import between, engine, flash, kept_in_url, parse_bool, pixels_of, run_card, show_flash
from storage import artifacts, queries
from storage.db import transaction
from storage.schema import Run

OBJECTIVES, MINERS = registry.objectives(), registry.miners()
SUPERVISION_HELP = {"auto": "labels when the dataset has them (InfoNCE: two views)",
                    "labels": "positives share a class", "self": "two augmented views of an image are the positive pair"}
DIMS, BATCH_SIZES = (16, 32, 64, 128, 256), (32, 64, 128, 256, 512, 1024, 2048)
DEFAULTS = {f.name: f.default for f in fields(RunConfig)}  # the form starts from RunConfig's recipe


def objective_changed() -> None:
    """A new objective starts from its own miner and settings (core.metric.registry), as a fresh form would."""
    spec = OBJECTIVES[st.session_state["loss"]]
    st.session_state["miner"] = spec.default_miner
    for setting in spec.settings:
        st.session_state[setting.name] = setting.default


def setting_widget(column, setting: registry.Setting):
    """The widget of one of the objective's or the miner's settings, kept in the URL under the setting's name."""
    if setting.choices:
        hint = setting.choice_help
        return column.selectbox(setting.title, setting.choices, help=setting.help or None,
                                format_func=lambda v: f"{v}: {hint[v]}" if v in hint else v,
                                key=kept_in_url(setting.name, setting.default, setting.choices))
    return column.number_input(setting.title, setting.low, setting.high, step=setting.step, help=setting.help or None,
                               key=kept_in_url(setting.name, setting.default, between(setting.low, setting.high), float))


@st.cache_data(max_entries=8, show_spinner="Augmenting a few images…")
def augmented_preview(dataset_id: int, seed: int) -> np.ndarray:
    """(n, 2, H, W, C) uint8: pairs of views as a self-supervised run makes them."""
    return augmented_pairs(pixels_of(dataset_id), n=6, seed=seed)


st.title("Train")
show_flash()

with transaction(engine()) as session:
    stored = {d.name: (d.id, d.labeled) for d in queries.list_datasets(session)}
names = list(stored) + [n for n, ok in builtin_names().items() if ok and n not in stored]

st.subheader("New run")
# every form value lives in the URL (kept_in_url), so a reload or a shared link keeps the form
dataset = st.selectbox("Dataset", names, key=kept_in_url("dataset", names[0] if names else None, names),
                       help="Built-in sets are imported on first use.")
c1, c2, c3 = st.columns(3)
encoder = c1.selectbox("Encoder", ENCODERS, key=kept_in_url("encoder", ENCODERS[0], ENCODERS),
                       format_func={"small_cnn": "Small CNN", "resnet18": "ResNet-18"}.get)
embedding_dim = c2.select_slider("Embedding size", DIMS,
                                 key=kept_in_url("dim", DEFAULTS["embedding_dim"], DIMS, int))
device = c3.selectbox("Device", DEVICES, key=kept_in_url("device", "auto", DEVICES),
                      help="auto picks CUDA when a GPU is present.")
loss = c1.selectbox("Objective", list(OBJECTIVES), key=kept_in_url("loss", "triplet", list(OBJECTIVES)),
                    format_func=lambda name: OBJECTIVES[name].title, on_change=objective_changed)
spec = OBJECTIVES[loss]
miner = c2.selectbox("Miner", spec.miners, key=kept_in_url("miner", spec.default_miner, spec.miners),
                     format_func=lambda name: MINERS[name].title)
# the objective's first setting beside its miner, the others (then the miner's own) on rows of their own
run_settings = registry.settings_of(loss, miner)
slots = [c3] + [column for _ in range(len(run_settings) // 3 + 1) for column in st.columns(3)]
settings = {setting.name: setting_widget(slot, setting) for slot, setting in zip(slots, run_settings)}
st.caption(f"**{spec.title}** {spec.explanation}  \n**Miner: {MINERS[miner].title}**, {MINERS[miner].explanation}")
with st.expander("What each objective and miner does"):
    st.markdown("\n".join(f"- **{o.title}**: {o.explanation} Miners: {', '.join(MINERS[m].title for m in o.miners)}."
                          for o in OBJECTIVES.values()))
    st.markdown("\n".join(f"- **{m.title}**: {m.explanation}" for m in MINERS.values()))
    st.caption("Miners over a whole category (all, hard, semi-hard, easy) are computed from the B×B distance "
               "matrix without listing the B³ triplets; batch-hard and FaceNet pick O(B²) triplets. The Triplets "
               "page shows what the miner picked and the loss each pick contributed.")
c1, c2, c3 = st.columns(3)
epochs = c1.number_input("Epochs", 1, 1000, key=kept_in_url("epochs", DEFAULTS["epochs"], between(1, 1000), int))
batch_size = c2.select_slider("Batch size", BATCH_SIZES,
                              key=kept_in_url("batch_size", DEFAULTS["batch_size"], BATCH_SIZES, int))
lr = c3.number_input("Learning rate", 1e-5, 1.0, format="%.5f",
                     key=kept_in_url("lr", DEFAULTS["lr"], between(1e-5, 1.0), float))

labeled = stored[dataset][1] if dataset in stored else True  # the built-in sets have labels
with st.expander("Supervision, batches and speed"):
    s1, s2, s3 = st.columns(3)
    supervision = s1.selectbox("Supervision", SUPERVISION, format_func=lambda v: f"{v}: {SUPERVISION_HELP[v]}",
                               key=kept_in_url("supervision", "auto", SUPERVISION))
    sampler = s2.selectbox("Batches", SAMPLERS, key=kept_in_url("sampler", "pk", SAMPLERS), format_func={
        "pk": "P classes × K images (every anchor has positives)", "random": "random images"}.get)
    samples_per_class = s3.number_input("K images per class", 2, 256, help="P = batch size // K classes a batch",
                                        key=kept_in_url("k", DEFAULTS["samples_per_class"], between(2, 256), int))
    precision = s1.selectbox("Precision", PRECISIONS, key=kept_in_url("precision", "auto", PRECISIONS),
                             help="auto: bf16 autocast on a CUDA GPU, float32 on CPU")
    compile_model = s2.checkbox("torch.compile the encoder", key=kept_in_url("compile", False, (True, False), parse_bool),
                                help="faster steps on a GPU after a compile of a minute")
try:
    learns_from = resolve_supervision(supervision, loss, labeled)
except ValueError as exc:
    learns_from = None
    st.warning(str(exc))
if learns_from == "self":
    st.caption("Self-supervised: each image's two augmented views are a positive pair, the rest of the batch "
               "negatives (crop, flip, colour jitter and grayscale for colour images, blur).")
    if dataset in stored:
        seed = st.session_state.setdefault("preview_seed", 0)
        pairs = augmented_preview(stored[dataset][0], seed)
        columns = st.columns(len(pairs))
        for column, pair in zip(columns, pairs):
            views = pair[..., 0] if pair.shape[-1] == 1 else pair  # (2, H, W) grey or (2, H, W, 3)
            column.image([enlarge(view, 72) for view in views], width=72, caption=["view 1", "view 2"])
        if st.button("Other images"):
            st.session_state["preview_seed"] = seed + 1
            st.rerun()
    else:
        st.caption("A preview of the views appears once the dataset is imported (on its first run).")

if st.button("Start training", type="primary", disabled=not names or learns_from is None):
    try:
        fields = {name: value for name, value in settings.items() if name in FIELD_SETTINGS}
        options = {name: value for name, value in settings.items() if name not in FIELD_SETTINGS}
        cfg = RunConfig(dataset=dataset, encoder=encoder, embedding_dim=embedding_dim, loss=loss, miner=miner,
                        **fields, options=options, epochs=int(epochs), batch_size=int(batch_size), lr=float(lr),
                        device=device, supervision=supervision, sampler=sampler,
                        samples_per_class=int(samples_per_class), precision=precision, compile=bool(compile_model))
        run_id = create_training_run(engine(), cfg)
    except (ValueError, LookupError, FileNotFoundError) as exc:
        st.error(str(exc))
    else:
        try:
            start_worker(engine(), run_id)
        except ValueError as exc:  # the Ray cluster did not take the job: the run is failed with this reason
            st.error(str(exc))
        else:
            st.toast(f"Run #{run_id} started")
        st.session_state["watching"] = run_id


@st.fragment(run_every=1.0)
def progress_panel() -> None:
    """Polls the runs' stored progress (the worker process writes it): the active runs, the newest
    finished and the newest completed one (so a run that ended while the page was away still shows
    its result) and the one this session started. Only this fragment reruns each second, so when a run it showed as active
    has ended, the whole page reruns: the lists below then include it."""
    refresh_liveness(engine())
    with transaction(engine()) as session:
        runs = queries.list_runs(session)
        active = [r for r in runs if r.status in queries.ACTIVE]
        finished = [r for r in runs if r.status not in queries.ACTIVE]
        newest_completed = next((r for r in finished if r.status == "completed"), None)
        watched = session.get(Run, st.session_state.get("watching", -1))
        latest = [*finished[:1], newest_completed, watched]  # a newer cancelled run must not hide a result
        for run in sorted({*active, *filter(None, latest)}, key=lambda r: -r.id):
            run_card(run)
        active_now = {r.id for r in active}
    ended = st.session_state.get("active_runs", set()) - active_now
    st.session_state["active_runs"] = active_now
    if ended:
        st.rerun(scope="app")


st.subheader("Runs")
st.caption("Active runs, the newest finished and completed ones and the last one you started; every run is on "
           "the Runs page.")
progress_panel()

st.divider()
st.subheader("Load an encoder instead")
st.caption("Embed a dataset with the encoder of a stored run, or with a checkpoint file this app wrote (.safetensors).")
with transaction(engine()) as session:
    sources = {r.id: f"#{r.id} {r.dataset.name} · {r.config.get('encoder')}" for r in queries.completed_runs(session)
               if r.kind == "train" and r.checkpoint}
target = st.selectbox("Dataset to embed", names, key="embed-dataset")
source = st.radio("Encoder", ["a stored run", "a checkpoint file"], horizontal=True)
source_run = upload = None
if source == "a stored run":
    source_run = st.selectbox("Run", list(sources), format_func=sources.get) if sources else None
    if not sources:
        st.caption("No completed training run yet.")
else:
    upload = st.file_uploader("Checkpoint", type=["safetensors"])
if st.button("Embed with this encoder", disabled=source_run is None and upload is None):
    try:
        if upload is not None:
            data, file_name = upload.getvalue(), upload.name
        else:
            with transaction(engine()) as session:
                data = artifacts.absolute(session.get(Run, source_run).checkpoint).read_bytes()
            file_name = f"run {source_run} encoder"
        run_id = create_embedding_run(engine(), target, data, file_name, source_run)
    except (CheckpointError, LookupError, ValueError) as exc:
        st.error(str(exc))
    else:
        st.session_state["watching"] = run_id
        try:
            start_worker(engine(), run_id)
        except ValueError as exc:
            st.error(str(exc))
        else:
            flash(f"Run #{run_id} embeds {target} with this encoder.", "info")
            st.rerun()
