"""Data: bring images (files, zips of class folders, a folder, built-in sets) and look at them."""
import streamlit as st

from core.data.catalog import dataset_contents, dataset_summaries
from core.data.datasets import FASHION_MNIST_HINT, builtin_names, ensure_builtin
from core.data.display import enlarge
from pages.common import engine, pixels_of
from pages.data_charts import class_counts_chart
from pages.data_import import import_form
from pages.data_versions import versions_section
from pages.signin import can, why_not
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
    if can("import"):
        import_form()
    else:
        st.info(why_not("import"))

st.divider()
st.subheader("Gallery")
datasets = dataset_summaries(engine())
if not datasets:
    st.caption("No dataset yet: use a built-in one or import images above.")
    st.stop()
chosen = st.selectbox("Dataset", datasets, format_func=lambda d: f"{d.name} ({d.n_images} images)")
version = versions_section(chosen.id, chosen.name)
contents = dataset_contents(engine(), chosen.id, version)
classes = chosen.classes
used = sum(contents.counts.values())  # the images the shown version uses (its excluded ones left out)
st.caption(
    (f"Version {version}: {used:,} of {chosen.n_images:,} images" if used != chosen.n_images else
     f"{chosen.n_images:,} images") + f", {chosen.image_size}×{chosen.image_size} pixels, "
    f"{'colour' if chosen.channels == 3 else 'grayscale'}, " + (f"{len(classes)} classes" if classes else "unlabeled")
)
if classes:
    st.altair_chart(class_counts_chart(classes, contents.counts), width="stretch")
pixels = pixels_of(chosen.id)
with st.expander("Duplicates: exact and near copies, and test images with a copy in training"):
    duplicates_section(chosen.id, chosen.n_images, pixels)
groups, excluded = {}, []
for image in contents.images:
    (excluded if image.excluded else groups.setdefault(image.label, [])).append((image.position, image.name))
sections = [(classes[label] if label is not None else "unlabeled", members)
            for label, members in sorted(groups.items(), key=lambda item: (item[0] is None, item[0]))]
for title, members in sections + ([("excluded in this version", excluded)] if excluded else []):
    st.markdown(f"**{title}** · {len(members)} images")
    shown = members[:GALLERY_PER_CLASS]
    st.image([enlarge(pixels[p]) for p, _ in shown], width=64,
             caption=[f"#{p} {n.rsplit('/', 1)[-1][:20]}" for p, n in shown])  # the id an edit names
