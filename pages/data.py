"""Data: bring images (files, zips of class folders, a folder, built-in sets) and look at them."""
import streamlit as st

from core.data.catalog import dataset_contents, dataset_summaries
from core.data.datasets import FASHION_MNIST_HINT, builtin_names, ensure_builtin
from core.data.display import enlarge
from core.data.importing import ImportReport, import_uploads
from core.data.ingest import IngestError
from pages.common import engine, pixels_of
from pages.data_duplicates import duplicates_section

GALLERY_PER_CLASS = 12

st.title("Data")

left, right = st.columns(2)
with left:
    st.subheader("Built-in datasets")
    for name, available in builtin_names().items():
        if available:
            if st.button(f"Use {name}", key=f"builtin-{name}"):
                with st.spinner(f"Importing {name}…"):
                    ensure_builtin(engine(), name)
                st.success(f"{name} is ready.")
        else:
            st.info(f"{name} is not installed. {FASHION_MNIST_HINT}")

with right:
    st.subheader("Import images")
    with st.form("import", clear_on_submit=True):
        name = st.text_input("Dataset name", placeholder="my-images")
        size = st.select_slider("Stored image size (pixels)", options=[16, 32, 48, 64, 96, 128], value=64)
        files = st.file_uploader(
            "Images, or a zip whose top-level folders are class labels",
            type=["png", "jpg", "jpeg", "webp", "bmp", "gif", "zip"], accept_multiple_files=True,
        )
        folder = st.file_uploader("…or a whole folder (subfolders are class labels)", accept_multiple_files="directory")
        submitted = st.form_submit_button("Import")
    if submitted:
        uploads = list(files or []) + list(folder or [])
        if not name.strip():
            st.error("Give the dataset a name.")
        elif not uploads:
            st.error("Choose some images, a zip or a folder first.")
        else:
            try:
                with st.spinner("Decoding images…"):
                    report: ImportReport = import_uploads(
                        engine(), name, [(f.name, f.getvalue()) for f in files or []], size,
                        folder_files=[(f.name, f.getvalue()) for f in folder or []],
                    )
            except (IngestError, ValueError) as exc:
                st.error(f"Nothing was imported. {exc}")
            else:
                st.success(f"Imported {report.n_images} images into “{report.name}” ({len(report.classes)} classes).")
                if report.duplicates:
                    st.info(f"{len(report.duplicates)} duplicate images were stored once: {', '.join(report.duplicates[:10])}")
                if report.rejected:
                    st.warning("Some files were not imported:\n\n" + "\n".join(f"- **{r.name}**: {r.reason}" for r in report.rejected))

st.divider()
st.subheader("Gallery")
datasets = dataset_summaries(engine())
if not datasets:
    st.caption("No dataset yet: use a built-in one or import images above.")
    st.stop()
chosen = st.selectbox("Dataset", datasets, format_func=lambda d: f"{d.name} ({d.n_images} images)")
contents = dataset_contents(engine(), chosen.id)
classes = chosen.classes
st.caption(
    f"{chosen.n_images} images, {chosen.image_size}×{chosen.image_size} pixels, "
    f"{'colour' if chosen.channels == 3 else 'grayscale'}, " + (f"{len(classes)} classes" if classes else "unlabeled")
)
if classes:
    st.bar_chart({classes[label]: count for label, count in sorted(contents.counts.items())}, horizontal=True, height=220)
pixels = pixels_of(chosen.id)
with st.expander("Duplicates: exact and near copies, and test images with a copy in training"):
    duplicates_section(chosen.id, chosen.n_images, pixels)
groups = {}
for image in contents.images:
    groups.setdefault(image.label, []).append((image.position, image.name))
for label, members in sorted(groups.items(), key=lambda item: (item[0] is None, item[0])):
    title = classes[label] if label is not None else "unlabeled"
    st.markdown(f"**{title}** · {len(members)} images")
    shown = members[:GALLERY_PER_CLASS]
    st.image([enlarge(pixels[p]) for p, _ in shown], width=64, caption=[n.rsplit("/", 1)[-1][:24] for _, n in shown])
