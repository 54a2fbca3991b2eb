"""The Explore map at full scale in a real browser: a 70,000-point run (stored embeddings of
clustered synthetic data with small generated images, no training) draws every point, all in
view; hovering a point shows its image and label; clicking it shows its neighbours; a box
selection shows the region's images; a selection (clicked, boxed, restored from the link) is drawn
in its points' own colours; picking a tool leaves the map where it is; "Show on map" on a failing
query selects that point.

Software WebGL (SwiftShader) in Debian's chromium, as a person's browser without a GPU would.
Screenshots in /tmp/e2e-map-*.png.
"""
from __future__ import annotations

import re
import time

import numpy as np
import pytest
from playwright.sync_api import expect, sync_playwright

from tests.helpers import (assert_fits_every_point, canvas_top, map_frame, point_on_page, selected_points,
                           share_in_own_colours)
from tests.test_browser import need_chromium, running_app, wait_idle

N = 70_000
OUTLIER = 4242  # moved away from every cluster on the map, so the mouse finds it alone
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"]


@pytest.fixture(scope="module")
def big_run(tmp_path_factory):
    need_chromium()
    home = tmp_path_factory.mktemp("bigmap") / "lab"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EMBEDDING_LAB_HOME", str(home))
        patch.delenv("EMBEDDING_LAB_DB", raising=False)
        from core.runs.worker import compute_statistics
        from storage import artifacts
        from storage.db import make_engine, transaction
        from storage.schema import ProjectionRow
        from tests.helpers import clustered_run

        engine = make_engine()
        made = clustered_run(engine, N)
        with transaction(engine) as session:
            row = session.query(ProjectionRow).filter_by(run_id=made["run_id"], method="umap").one()
            path = artifacts.absolute(row.path)
        coords = np.load(path)
        coords[OUTLIER] = coords.max(axis=0) + 6.0  # alone in the top-right corner
        np.save(path, coords)
        assert compute_statistics(engine, made["run_id"]).status == "done"  # what the run's job does
        engine.dispose()
    yield {"home": home, **made}


@pytest.fixture(scope="module")
def server(big_run, tmp_path_factory):
    with running_app(big_run["home"], tmp_path_factory.mktemp("bigmap-log") / "streamlit.log") as url:
        yield url


def shot(page, name: str) -> None:
    page.screenshot(path=f"/tmp/e2e-map-{name}.png")


def box_around(page, point: int, half: int) -> None:
    """Box-select a square of 2 × half pixels around a point of the map, dragged as a person would;
    picking the tool must not move the map (a shorter hint once let the map jump up ~20 px)."""
    frame = map_frame(page)
    top = canvas_top(frame)
    frame.locator("button[data-mode=box]").click()
    assert canvas_top(frame) == top
    cx, cy = point_on_page(page, frame, point)
    page.mouse.move(cx - half, cy - half)
    page.mouse.down()
    for step in range(1, 11):
        page.mouse.move(cx - half + half * step / 5, cy - half + half * step / 5)
        time.sleep(0.03)
    page.mouse.up()


def test_every_point_hover_click_and_region_at_70k(server, big_run):
    labels = big_run["labels"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100}, color_scheme="light")
        page.set_default_timeout(60_000)
        try:
            page.goto(f"{server}/explore")
            expect(page.get_by_role("heading", name="Map (UMAP)")).to_be_visible(timeout=120_000)
            frame = map_frame(page)
            drawn = frame.evaluate("() => window.__map.points")
            paint = frame.evaluate("() => window.__map.firstPaintMs")
            print(f"first paint of {drawn:,} points: {paint:.0f} ms after the page's data arrived")
            assert drawn == N
            expect(frame.locator("#legend")).to_contain_text("class 0")
            expect(frame.locator("#status")).to_have_text("")
            assert_fits_every_point(frame)
            shot(page, "1-map")

            # hover: the image and the label of exactly that point
            x, y = point_on_page(page, frame, OUTLIER)
            page.mouse.move(x - 30, y - 30)
            page.mouse.move(x, y, steps=5)
            tip = frame.locator("#tip")
            expect(tip).to_be_visible(timeout=20_000)
            expect(tip).to_contain_text(f"#{OUTLIER} · class {labels[OUTLIER]}")
            background = frame.locator("#tip .thumb").evaluate("e => getComputedStyle(e).backgroundImage")
            sheet = re.search(r'url\("([^"]+sheet-(\d+)\.png)"\)', background)
            assert sheet and int(sheet.group(2)) == OUTLIER // 256, background
            loaded = frame.evaluate(
                "url => new Promise(r => { const i = new Image(); i.onload = () => r(i.naturalWidth);"
                " i.onerror = () => r(-1); i.src = url; })", sheet.group(1))
            assert loaded == 16 * 12  # a sheet of 16 × 16 images of 12 px
            shot(page, "2-hover")

            # click: that point's neighbours, from Python
            page.mouse.click(x, y)
            expect(page.get_by_role("heading", name="Nearest neighbours")).to_be_visible(timeout=60_000)
            expect(page.get_by_text(f"query #{OUTLIER} · class {labels[OUTLIER]}", exact=True)).to_be_visible()
            expect(page.get_by_text(re.compile(r"^class \d · d=\d\.\d{3}$"))).to_have_count(8)
            wait_idle(page, 60_000)
            frame = map_frame(page)
            assert selected_points(frame) == [OUTLIER]
            assert share_in_own_colours(frame, [OUTLIER], labels) == 1  # not the flat blue it once was
            shot(page, "3-neighbours")

            # box selection: the region's images and their class counts
            box_around(page, int(np.flatnonzero(labels == 0)[0]), 25)
            region = page.get_by_role("heading", name=re.compile(r"^Selected region: [\d,]+ images$"))
            expect(region).to_be_visible(timeout=60_000)
            count = int(region.inner_text().split(": ")[1].split()[0].replace(",", ""))
            assert 1 <= count < N
            expect(page.get_by_text(re.compile(r"^#\d+ · class \d$")).first).to_be_visible()
            expect(page.get_by_role("heading", name="Nearest neighbours")).to_have_count(0)
            wait_idle(page, 60_000)
            frame = map_frame(page)
            boxed = selected_points(frame)
            # (a share: where points of two classes overlap, one is drawn over the other)
            assert share_in_own_colours(frame, boxed[::max(1, len(boxed) // 300)], labels) >= 0.5
            region.scroll_into_view_if_needed()
            shot(page, "4-region")

            # a second box elsewhere: the map lights the new region, not the previous one (it drew
            # the page's old selection while the page listed the new one)
            frame = map_frame(page)
            first = set(frame.evaluate("() => Array.from(window.__map.selected())"))
            assert len(first) == count
            box_around(page, int(np.flatnonzero(labels == 1)[0]), 20)
            expect(region).not_to_have_text(f"Selected region: {count:,} images", timeout=60_000)
            wait_idle(page, 60_000)
            second = int(region.inner_text().split(": ")[1].split()[0].replace(",", ""))
            frame = map_frame(page)
            frame.wait_for_function(f"() => window.__map.selected().length === {second}", timeout=30_000)
            lit = set(frame.evaluate("() => Array.from(window.__map.selected())"))
            assert len(lit) == second and lit != first
            expect(page).to_have_url(re.compile(r"region="), timeout=60_000)

            # the link keeps the view: a reload shows the same region and tab
            page.get_by_role("tab", name="Label errors").click()
            # the link changes on the rerun the click asks for, which a busy machine may start after
            # wait_idle has seen the page idle: wait for the link itself
            expect(page).to_have_url(re.compile(r"tab=Label"), timeout=60_000)
            wait_idle(page, 60_000)
            page.reload()
            expect(page.get_by_role("heading", name=f"Selected region: {second:,} images")).to_be_visible(timeout=120_000)
            expect(page.get_by_role("tab", name="Label errors")).to_have_attribute("aria-selected", "true")
            frame = map_frame(page)
            frame.wait_for_function(f"() => window.__map.ready && window.__map.selected().length === {second}",
                                    timeout=60_000)
            restored = selected_points(frame)
            assert share_in_own_colours(frame, restored[::max(1, len(restored) // 300)], labels) >= 0.5

            # a click on a legend entry hides that class's points, a second shows them again
            entry = frame.locator("#legend button.entry", has_text="class 0")
            entry.click()
            frame.wait_for_function("() => window.__map.hidden.includes('class 0')")
            expect(entry).to_have_class(re.compile("hidden"))
            entry.click()
            frame.wait_for_function("() => window.__map.hidden.length === 0")
            wait_idle(page, 60_000)

            # a failing query's "Show on map" selects that point and shows its neighbours
            page.get_by_role("tab", name="Failing queries").click()
            switch = page.get_by_role("switch", name="Limit the failing queries and label errors below to this region")
            expect(switch).to_be_checked()
            page.get_by_text("Limit the failing queries and label errors below to this region").click()
            expect(switch).not_to_be_checked()  # look past the region: every query
            wait_idle(page, 60_000)
            wait_idle(page, 60_000)
            page.get_by_role("button", name="Show on map").first.click()
            expect(page.get_by_role("heading", name="Nearest neighbours")).to_be_visible(timeout=60_000)
            expect(page.get_by_text(re.compile(r"^query #\d+ · class \d$"))).to_be_visible()
            selected = map_frame(page).evaluate("() => Array.from(window.__map.selected())")
            shown = int(page.get_by_text(re.compile(r"^query #\d+ · class \d$")).inner_text().split("#")[1].split()[0])
            assert selected == [shown]
            shot(page, "5-failing-query")
        except Exception:
            shot(page, "failure")
            raise
        finally:
            browser.close()
