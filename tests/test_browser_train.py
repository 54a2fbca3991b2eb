"""The Train page's run cards in a real browser while a run trains and ends.

Streamlit redraws the cards once a second, element by element, each in place of the one drawn
there before; only a browser shows what a person sees in between. Before the fix, when a run
ended, its card kept the running run's Cancel button and the card of a run no longer followed
stayed under it for the 2-3 s of the page's rerun. This samples the cards every few tens of
milliseconds from the start of a three-epoch digits run until the page has rerun after its end.
"""
from __future__ import annotations

import os
import time

import pytest
from playwright.sync_api import sync_playwright

from tests.test_browser import CHROMIUM, running_app, wait_idle

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]
FINISHED = ("completed", "cancelled", "failed", "interrupted")

# Each card's visible text (header first), whether it shows a Cancel button and a chart. (A card's
# container has the CSS class st-key-run-card-<place>, pages/run_widgets.run_card.)
CARDS = """() => Array.from(document.querySelectorAll('[class*="st-key-run-card-"]'))
  .map(block => ({text: block.innerText.split('\\n').filter(line => line.trim()).join(' | '),
                  cancel: Array.from(block.querySelectorAll('button')).some(
                      b => b.innerText.trim() === 'Cancel' && b.checkVisibility()),
                  chart: Array.from(block.querySelectorAll('[data-testid="stVegaLiteChart"]')).some(
                      c => c.checkVisibility())}))"""


def mixtures(cards: list[dict]) -> list[str]:
    """What no card may show, even for a moment: a Cancel button or a live chart under a header
    saying the run ended, or two states at once (two progress lines or results, a running run's
    header above a result)."""
    wrong = []
    for card in cards:
        header, text = card["text"].split(" | ")[0], card["text"]
        if (card["cancel"] or card["chart"]) and any(word in header for word in FINISHED):
            wrong.append(f"Cancel or live chart on an ended run: {card}")
        if text.count(" · step ") > 1 or text.count("Done in") > 1:
            wrong.append(f"two states in one card: {text}")
        if any(word in header for word in ("running", "queued")) and "Done in" in text:
            wrong.append(f"a result under an active run's header: {text}")
    return wrong


@pytest.fixture
def digits_home(tmp_path, monkeypatch):
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: the browser test needs Debian's chromium")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    home = tmp_path / "lab"
    monkeypatch.setenv("EMBEDDING_LAB_HOME", str(home))  # for the worker start_worker spawns here
    monkeypatch.delenv("EMBEDDING_LAB_DB", raising=False)
    from core.data.datasets import ensure_builtin
    from storage.db import make_engine

    engine = make_engine()
    ensure_builtin(engine, "digits")
    yield home, engine
    engine.dispose()


def test_run_cards_never_mix_two_states_while_a_run_trains_and_ends(digits_home, tmp_path):
    from core.runs.jobs import create_training_run, start_worker
    from core.training.config import RunConfig
    from storage.db import transaction
    from storage.schema import Run

    home, engine = digits_home
    with running_app(home, tmp_path / "streamlit.log") as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 2400})
        page.goto(f"{url}/train")
        page.wait_for_selector("text=New run", timeout=90_000)
        wait_idle(page)
        first = create_training_run(engine, RunConfig(dataset="digits", epochs=1, batch_size=128))
        start_worker(engine, first)  # ended before the watched one: a card that must give way to it
        seen, wrong, started = [], [], time.monotonic()
        watched, ended_at = None, None
        while time.monotonic() - started < 240:
            cards = page.evaluate(CARDS)
            seen.append(cards)
            wrong += mixtures(cards)
            if watched is None:
                with transaction(engine) as session:
                    if session.get(Run, first).status == "completed":
                        watched = create_training_run(engine, RunConfig(dataset="digits", epochs=6, batch_size=128))  # long enough to be seen running on a busy machine
                        start_worker(engine, watched)
            elif ended_at is None and any(c["text"].startswith(f"Run #{watched} ") and "completed" in
                                          c["text"].split(" | ")[0] for c in cards):
                ended_at = time.monotonic()
            elif ended_at is not None and time.monotonic() - ended_at > 6:  # the page's rerun is done by now
                break
            page.wait_for_timeout(40)
        page.screenshot(path="/tmp/e2e-train-cards.png", full_page=True)
        browser.close()
    assert watched is not None and ended_at is not None, seen[-1:]
    assert not wrong, wrong[:5]
    running = [card for cards in seen for card in cards
               if card["text"].startswith(f"Run #{watched} ") and "running" in card["text"].split(" | ")[0]]
    assert any(" elapsed" in card["text"] for card in running), running[-1:]
    assert any("left at the pace so far" in card["text"] for card in running), running[-1:]
    assert any(card["chart"] for card in running)  # the live loss curve
    final = seen[-1]  # after the page's rerun: the ended run alone (newest finished and completed), no Cancel
    assert final and all(c["text"].startswith(f"Run #{watched} ") and not c["cancel"] for c in final), final
