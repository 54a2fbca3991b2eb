"""The Data page's chart of images per class."""
import altair as alt
import pandas as pd

BAR_STEP = 20  # pixels per class: room for a label of the axis's 11-12 px font with its padding


def class_counts_chart(classes: list[str] | tuple[str, ...], counts: dict) -> alt.Chart:
    """Horizontal bars, one per class in the dataset's class order, each labelled: the chart grows
    BAR_STEP pixels per class and the axis never drops a label that would overlap (Altair's
    default did, labelling 5 of Fashion-MNIST's 10 bars in a 220 px chart)."""
    labels = sorted(label for label in counts if label is not None)  # (None: the unlabeled images)
    frame = pd.DataFrame({"class": [str(classes[label]) for label in labels],
                          "images": [int(counts[label]) for label in labels]})
    return alt.Chart(frame).mark_bar().encode(
        y=alt.Y("class:N", sort=list(map(str, classes)), title=None,
                axis=alt.Axis(labelOverlap=False, labelLimit=300)),
        x=alt.X("images:Q", title="images"),
        tooltip=["class", alt.Tooltip("images:Q", format=",")],
    ).properties(height=alt.Step(BAR_STEP))
