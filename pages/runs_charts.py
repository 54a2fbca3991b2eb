"""The Runs page's charts of the compared runs' stored epochs: the loss, one panel per objective
(each on its own scale), and the probe's Precision@1 after each epoch."""
import altair as alt
import pandas as pd

PANEL_WIDTH, PANEL_HEIGHT = 250, 200  # two panels and the legend fit the narrowest main column (about 640 px)


def loss_chart(curves: pd.DataFrame) -> alt.FacetChart:
    """One panel per objective, each with its own y-scale: InfoNCE's loss (about 6 on Fashion-MNIST)
    would flatten a contrastive one (0.09) to a line on a shared axis. curves: epoch_curves' rows."""
    return alt.Chart(curves).mark_line(point=True).encode(
        x=alt.X("epoch:Q", axis=alt.Axis(tickMinStep=1, format="d")),
        y=alt.Y("loss:Q", scale=alt.Scale(zero=False)),
        color="run:N", tooltip=["run", "objective", "epoch", alt.Tooltip("loss:Q", format=".4f")],
    ).properties(width=PANEL_WIDTH, height=PANEL_HEIGHT).facet(
        facet=alt.Facet("objective:N", title=None), columns=2,
    ).resolve_scale(y="independent")


def precision_chart(curves: pd.DataFrame) -> alt.Chart:
    """Precision@1 of each run's probe after each epoch, on one scale for all runs (comparable
    here, whatever their objective) from the lowest value shown to 1 (a 0-1 axis flattened every
    run at its top); only the epochs that have one (a labelled probe)."""
    probed = curves.dropna(subset=["precision_at_1"])
    return alt.Chart(probed).mark_line(point=True).encode(
        x=alt.X("epoch:Q", axis=alt.Axis(tickMinStep=1, format="d")),
        y=alt.Y("precision_at_1:Q", title="Precision@1", scale=alt.Scale(zero=False, domainMax=1)),
        color="run:N", tooltip=["run", "objective", "epoch", alt.Tooltip("precision_at_1:Q", format=".3f")],
    ).properties(height=PANEL_HEIGHT)
