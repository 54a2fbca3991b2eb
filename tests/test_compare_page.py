"""The Compare page through Streamlit's AppTest: two stored runs of one dataset (B is A moved by
noise), picked from the link; the figures are the comparison's; a link naming the same run
twice, or a malformed run, says so; a run without statistics offers to compute them."""
import json

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from core.explore.compare import compare_runs
from tests.helpers import clustered_run, stored_run

TIMEOUT = 120
N = 400


pytestmark = pytest.mark.usefixtures("fresh_caches")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A clustered run A (with a stored map), run B of the same dataset (A's embeddings moved by
    noise), both with statistics, and run C without statistics."""
    from core.runs.worker import compute_statistics
    from storage.db import make_engine

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EMBEDDING_LAB_HOME", str(tmp_path_factory.mktemp("compare-page")))
        patch.delenv("EMBEDDING_LAB_DB", raising=False)
        engine = make_engine()
        made = clustered_run(engine, N, classes=4)
        assert compute_statistics(engine, made["run_id"]).status == "done"
        moved = made["embeddings"] + np.random.default_rng(1).normal(size=made["embeddings"].shape) * 1.5
        b = stored_run(engine, made["dataset_id"], moved, config={"encoder": "stored", "noise": 1.5})
        c = stored_run(engine, made["dataset_id"], made["embeddings"], statistics=False)
        yield {"engine": engine, "a": made["run_id"], "b": b, "c": c, "labels": made["labels"]}
        engine.dispose()


def opened(**params) -> AppTest:
    at = AppTest.from_file("../pages/compare.py", default_timeout=TIMEOUT)
    at.query_params.update({k: str(v) for k, v in params.items()})
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def texts(at: AppTest) -> str:
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption] + [s.value for s in at.subheader]
    parts += [x.value for x in at.info] + [x.value for x in at.warning] + [x.value for x in at.error]
    return "\n".join(str(p) for p in parts)


def maps(at: AppTest) -> list[dict]:
    return [json.loads(element.proto.json_args) for element in at.get("component_instance")]


def test_compare_page_shows_both_maps_and_the_comparisons_figures(store):
    at = opened(a=store["a"], b=store["b"])
    expected = compare_runs(store["engine"], store["a"], store["b"])
    assert at.selectbox(key="a").value == store["a"] and at.selectbox(key="b").value == store["b"]
    a_map, b_map = maps(at)
    assert a_map["n"] == b_map["n"] == N and a_map["link"]["group"] == b_map["link"]["group"]
    assert a_map["link"]["url"] is None  # one dataset: points are matched by position
    assert at.metric[0].value == f"{expected.mean_agreement:.3f}"
    p1 = expected.overall[0]
    assert at.metric[1].value == f"{p1['b']:.3f}"
    assert at.metric[1].delta == f"{p1['difference']:+.3f} [{p1['low']:+.3f}, {p1['high']:+.3f}]"
    per_class = at.dataframe[0].value
    assert list(per_class["class"]) == [row["name"] for row in expected.per_class]
    assert np.allclose(per_class["MAP@R B − A"], [row["map_at_r_difference"] for row in expected.per_class])
    settings = at.dataframe[-1].value
    assert settings.iloc[0]["setting"] == "noise" and settings.iloc[0]["differs"] == "≠"
    body = texts(at)
    assert "Images that moved most" in body and "Confusion difference" in body
    assert len(at.get("arrow_vega_lite_chart") or at.get("vega_lite_chart")) == 1


def test_compare_colourings_and_a_linked_selection(store):
    at = opened(a=store["a"], b=store["b"], colour_a="agreement", colour_b="flip")
    a_map, b_map = maps(at)
    assert a_map["colour_title"].startswith("neighbourhood agreement") and b_map["colour_title"].startswith("nearest")
    assert sum(entry["count"] for entry in a_map["legend"]) == N
    # a lasso in map A (its component's value) selects the same images in map B
    from core.explore.service import explore_run

    key = f"compare-{explore_run(store['engine'], store['a']).run_key}-{explore_run(store['engine'], store['b']).run_key}"
    at.session_state[f"{key}-map-a"] = {"type": "region", "points": [5, 3, 17], "nonce": 1}
    at.run()
    a_map, b_map = maps(at)
    assert a_map["selected"] == b_map["selected"] == [3, 5, 17]
    assert "Selected: 3 shared images" in texts(at)


def test_compare_link_naming_the_same_run_or_garbage_says_so(store):
    at = opened(a=store["a"], b=store["a"])
    assert f"Run A and run B are both run #{store['a']}" in texts(at) and not maps(at)
    at = opened(a="x7", b=store["b"])
    assert "The link names 'x7' as run A, which is not a run number." in texts(at)
    at = opened(a=987654, b=store["b"])
    assert "The link names run 987654 as run A, but run 987654 does not exist (deleted?)." in texts(at)


def test_compare_offers_to_compute_missing_statistics(store):
    at = opened(a=store["c"], b=store["b"])
    assert f"Run #{store['c']}**: its statistics" in texts(at) and not maps(at)
    assert any(b.label == "Compute the statistics and the UMAP map" for b in at.button)


def test_comparison_colourings_bin_each_value_and_grey_the_unshared():
    from core.explore.map_files import comparison_column

    nan = float("nan")
    categories, legend = comparison_column("agreement", np.array([0, 0.19, 0.2, 0.55, 1.0, nan]))
    assert categories.tolist() == [0, 0, 1, 2, 4, 5] and legend[-1] == {
        "name": "not shared", "colour": legend[-1]["colour"], "count": 1, "background": True}
    categories, legend = comparison_column("ap_change", np.array([-0.3, -0.1, 0.0, 0.04, 0.1, 0.3, nan]))
    assert categories.tolist() == [0, 1, 2, 2, 3, 4, 5] and [e["count"] for e in legend] == [1, 1, 2, 1, 1, 1]
    categories, legend = comparison_column("flip", np.array([-1, 0, 1, nan]))
    assert categories.tolist() == [0, 1, 2, 3] and legend[0]["name"] == "right → wrong"
    with pytest.raises(ValueError, match="unknown comparison colouring 'x'"):
        comparison_column("x", np.zeros(2))
