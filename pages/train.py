"""Train: choose the objective, start a worker process, watch its stored progress."""
import streamlit as st

from core.config import DEFAULT_MINER, ENCODERS, LOSS_HELP, LOSSES, MINER_HELP, MINERS_FOR, RunConfig
from core.datasets import builtin_names
from core.jobs import cancel_run, create_embedding_run, create_training_run, refresh_liveness, start_worker
from models.checkpoint import CheckpointError
from pages.common import METRIC_NAMES, STATUS_ICON, engine
from storage import artifacts, queries
from storage.db import transaction
from storage.schema import Run

st.title("Train")

with transaction(engine()) as session:
    stored = [d.name for d in queries.list_datasets(session)]
names = stored + [n for n, ok in builtin_names().items() if ok and n not in stored]

st.subheader("New run")
dataset = st.selectbox("Dataset", names, help="Built-in sets are imported on first use.")
c1, c2, c3 = st.columns(3)
encoder = c1.selectbox("Encoder", ENCODERS, format_func={"small_cnn": "Small CNN", "resnet18": "ResNet-18"}.get)
embedding_dim = c2.select_slider("Embedding size", [16, 32, 64, 128, 256], value=64)
device = c3.selectbox("Device", ["auto", "cpu", "cuda"], help="auto picks CUDA when a GPU is present.")
loss = c1.selectbox("Objective", LOSSES, index=LOSSES.index("triplet"))
miners = MINERS_FOR[loss]
miner = c2.selectbox("Miner", miners, index=miners.index(DEFAULT_MINER[loss]))
if loss == "infonce":
    margin, temperature = 0.2, c3.number_input("Temperature τ", 0.01, 10.0, 0.1, step=0.01)
else:
    margin, temperature = c3.number_input("Margin m", 0.01, 10.0, 0.2 if loss == "triplet" else 0.5, step=0.05), 0.1
st.caption(f"**{loss}**: {LOSS_HELP[loss]}  \n**{miner}**: {MINER_HELP[miner]}")
epochs = c1.number_input("Epochs", 1, 1000, 5)
batch_size = c2.select_slider("Batch size", [32, 64, 128, 256, 512, 1024], value=256)
lr = c3.number_input("Learning rate", 1e-5, 1.0, 1e-3, format="%.5f")

if st.button("Start training", type="primary", disabled=not names):
    try:
        cfg = RunConfig(dataset=dataset, encoder=encoder, embedding_dim=embedding_dim, loss=loss, miner=miner,
                        margin=float(margin), temperature=float(temperature), epochs=int(epochs),
                        batch_size=int(batch_size), lr=float(lr), device=device)
        run_id = create_training_run(engine(), cfg)
    except (ValueError, LookupError, FileNotFoundError) as exc:
        st.error(str(exc))
    else:
        start_worker(engine(), run_id)
        st.session_state["watching"] = run_id
        st.toast(f"Run #{run_id} started")


@st.fragment(run_every=1.0)
def progress_panel() -> None:
    """Polls the runs' stored progress; the worker process writes it."""
    refresh_liveness(engine())
    with transaction(engine()) as session:
        active = [r for r in queries.list_runs(session) if r.status in queries.ACTIVE]
        watched = session.get(Run, st.session_state.get("watching", -1))
        shown = active + ([watched] if watched is not None and watched not in active else [])
        for run in shown:
            _show_run(run)


def _show_run(run: Run) -> None:
    with st.container(border=True):
        head, button = st.columns([5, 1])
        details = " · ".join(filter(None, [run.config.get("loss"), run.phase, run.device]))
        head.markdown(f"**Run #{run.id}** {STATUS_ICON.get(run.status, '')} {run.status} · {details}")
        if run.status in queries.ACTIVE and button.button("Cancel", key=f"cancel-{run.id}"):
            cancel_run(engine(), run.id)
        fraction = run.step / run.total_steps if run.total_steps else 0.0
        st.progress(min(1.0, fraction), text=f"epoch {run.epoch} · step {run.step}/{run.total_steps or '?'}")
        if run.last_loss is not None:
            counts = run.recent_counts or {}
            a, b, c, d = st.columns(4)
            a.metric("loss", f"{run.last_loss:.4f}")
            b.metric("easy", f"{counts.get('easy', 0):,}")
            c.metric("semi-hard", f"{counts.get('semi_hard', 0):,}")
            d.metric("hard", f"{counts.get('hard', 0):,}")
        if run.status == "completed" and run.metrics:
            st.success(f"Done in {run.seconds:.0f} s · " + " · ".join(
                f"{title} {run.metrics[key]:.3f}" for key, title in METRIC_NAMES.items() if key in run.metrics))
        elif run.reason and run.status != "completed":
            st.error(run.reason.splitlines()[0])


st.subheader("Runs")
st.caption("Active runs and the last one you started; every run is on the Runs page.")
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
        st.caption("No trained run yet.")
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
        start_worker(engine(), run_id)
        st.session_state["watching"] = run_id
        st.rerun()
