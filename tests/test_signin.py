"""Sign-in and roles (core.access, pages/signin.py): every write is checked in the service that
performs it, whoever calls it; a real OpenID Connect sign-in in Chromium (a provider on the
loopback interface, Streamlit's st.login) gives a viewer no write controls, an editor a training
run, an admin a delete; demo mode refuses every write; the command line keeps every right."""
import socket
import time

import numpy as np
import pytest

from core import access
from core.access import Forbidden, Identity


@pytest.fixture
def stored(engine):
    """digits with a completed run made by the machine's owner."""
    from tests.helpers import completed_digits_run

    return engine, completed_digits_run(engine)


@pytest.fixture(autouse=True)
def nobody_afterwards():
    yield
    access.act_as(None)


def test_services_refuse_what_the_role_does_not_allow_whoever_calls_them(stored):
    from core.data.versions import delete_version, make_version
    from core.runs.jobs import cancel_run, create_training_run, delete_run
    from core.training.config import RunConfig
    from storage.db import transaction
    from storage.schema import Deletion, Run

    engine, run_id = stored
    cfg = RunConfig(dataset="digits", epochs=1, batch_size=64)
    access.act_as(Identity("vera@lab.test", "viewer"))  # a forged request: the service is called directly
    for attempt, words in ((lambda: create_training_run(engine, cfg), "may not start a run: that needs the editor"),
                           (lambda: make_version(engine, "digits", exclude=[3]), "may not edit a dataset"),
                           (lambda: delete_run(engine, run_id), "may not delete: that needs the admin role"),
                           (lambda: cancel_run(engine, run_id), "may not cancel someone else's run")):
        with pytest.raises(Forbidden, match=words):
            attempt()
    with transaction(engine) as session:
        assert session.query(Run).count() == 1  # nothing was stored by the refusals

    access.act_as(Identity("ed@lab.test", "editor"))
    mine = create_training_run(engine, cfg)
    assert make_version(engine, "digits", exclude=[3]) == 2
    with pytest.raises(Forbidden, match="may not delete"):
        delete_version(engine, "digits@2")
    with pytest.raises(Forbidden, match="may not cancel someone else's run"):
        cancel_run(engine, run_id)
    assert cancel_run(engine, mine) == "cancelled"  # their own
    with transaction(engine) as session:
        assert session.get(Run, mine).created_by == "ed@lab.test" and session.get(Run, run_id).created_by is None
    from core.runs.overview import runs_table

    assert {row["run"]: row["by"] for row in runs_table(engine)} == {mine: "ed@lab.test", run_id: ""}  # the Runs page

    access.act_as(Identity("ada@lab.test", "admin"))
    delete_run(engine, mine)
    with transaction(engine) as session:
        [gone] = session.query(Deletion).all()
        assert (gone.kind, gone.object_id, gone.deleted_by) == ("run", mine, "ada@lab.test") and gone.deleted_at

    access.act_as(Identity("ada@lab.test", "admin", demo=True))
    with pytest.raises(Forbidden, match="read-only demo: nobody may start a run"):
        create_training_run(engine, cfg)
    access.act_as(None)  # the command line: the machine's owner
    assert create_training_run(engine, cfg) > mine


def test_the_command_line_keeps_every_right_and_demo_mode_reads_its_switch(monkeypatch):
    assert access.current() is None and access.allowed("delete")
    monkeypatch.setenv(access.DEMO_ENV, "yes")
    assert access.demo_mode()
    monkeypatch.setenv(access.DEMO_ENV, "0")
    assert not access.demo_mode()
    with pytest.raises(ValueError, match="a role is one of viewer, editor, admin"):
        Identity("x@lab.test", "owner")


# ---------------------------------------------------------------- a real sign-in, in Chromium


@pytest.fixture
def chromium() -> str:
    from tests.test_browser import need_chromium

    return need_chromium()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def signed_in_app(chromium, tmp_path):
    """The app with an [auth] section naming a provider started here, and roles for three emails."""
    from oidc_provider_mock import run_server_in_thread

    from tests.test_browser import running_app

    port = free_port()
    with run_server_in_thread(port=0) as provider:
        secrets = tmp_path / "secrets.toml"
        secrets.write_text(f'''
[auth]
redirect_uri = "http://127.0.0.1:{port}/oauth2callback"
cookie_secret = "{'s' * 40}"
client_id = "embedding-lab"
client_secret = "not-a-secret"
server_metadata_url = "http://127.0.0.1:{provider.server_port}/.well-known/openid-configuration"

[roles]
admins = ["ada@lab.test"]
editors = ["ed@lab.test"]
viewers = ["vera@lab.test"]
''')
        home = tmp_path / "lab"
        home.mkdir()
        with running_app(home, tmp_path / "streamlit.log", port=port,
                         options=["--secrets.files", str(secrets)]) as url:
            yield url, home


def sign_in(page, url: str, email: str, then: str = "Signed in as {email}") -> None:
    from tests.test_browser import wait_idle

    page.goto(url)
    page.get_by_role("button", name="Sign in").click()
    page.locator('input[name="sub"]').fill(email)  # the provider's own form: any subject, its email the same
    page.get_by_role("button", name="Authorize").click()
    page.get_by_text(then.format(email=email)).wait_for(timeout=60_000)
    wait_idle(page)


def sign_out(page) -> None:
    page.get_by_role("button", name="Sign out").click()
    page.get_by_role("button", name="End session").click()  # the provider's own confirmation
    page.get_by_role("button", name="Sign in").wait_for(timeout=60_000)


def test_a_viewer_an_editor_and_an_admin_sign_in_with_their_rights(signed_in_app, chromium, monkeypatch):
    from playwright.sync_api import expect, sync_playwright

    from tests.test_browser import CHROMIUM_ARGS, go_to, wait_idle

    url, home = signed_in_app
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(30_000)
        try:
            page.goto(url)  # not signed in: nothing but the sign-in
            expect(page.get_by_role("button", name="Sign in")).to_be_visible()
            page.screenshot(path="/tmp/e2e-signin-first.png")
            expect(page.locator('[data-testid="stSidebarNav"]')).to_have_count(0)

            sign_in(page, url, "vera@lab.test")
            expect(page.get_by_text("Signed in as vera@lab.test (viewer)")).to_be_visible()
            expect(page.get_by_text("may not import images: that needs the editor role")).to_be_visible()
            expect(page.get_by_role("button", name="Import")).to_have_count(0)
            page.screenshot(path="/tmp/e2e-signin-viewer-data.png")
            go_to(page, "Train")
            expect(page.get_by_role("button", name="Start training")).to_be_disabled()
            page.screenshot(path="/tmp/e2e-signin-viewer-train.png")
            expect(page.get_by_text("may not start a run: that needs the editor role")).to_be_visible()
            sign_out(page)

            sign_in(page, url, "ed@lab.test")
            go_to(page, "Train")
            page.get_by_label("Epochs").fill("1")
            page.get_by_label("Epochs").press("Enter")
            wait_idle(page)
            page.get_by_role("button", name="Start training").click()
            expect(page.get_by_text("Run #1 ", exact=False).first).to_be_visible(timeout=60_000)
            sign_out(page)

            sign_in(page, url, "stranger@lab.test", then="{email} may not use this app")  # named by no role
            expect(page.locator('[data-testid="stSidebarNav"]')).to_have_count(0)
            sign_out(page)

            sign_in(page, url, "ada@lab.test")
            go_to(page, "Runs")
            page.get_by_text("Yes, delete run #1 and its files").click()
            wait_idle(page)
            page.get_by_role("button", name="Delete run").click()
            expect(page.get_by_text("Deleted run #1.")).to_be_visible(timeout=60_000)
        except Exception:
            page.screenshot(path="/tmp/e2e-signin-failure.png")
            raise
        finally:
            browser.close()
    from storage.db import make_engine, transaction
    from storage.schema import Deletion

    monkeypatch.setenv("EMBEDDING_LAB_HOME", str(home))
    monkeypatch.delenv("EMBEDDING_LAB_DB", raising=False)
    engine = make_engine()
    with transaction(engine) as session:
        [gone] = session.query(Deletion).all()
        assert (gone.kind, gone.object_id, gone.deleted_by) == ("run", 1, "ada@lab.test")
    engine.dispose()


def test_per_person_limits_refuse_the_next_run_and_upload_with_a_sentence(stored, monkeypatch):
    from core.data.importing import import_uploads
    from core.runs.jobs import create_training_run
    from core.training.config import RunConfig
    from storage.db import transaction
    from storage.schema import Dataset, Run
    from tests.test_duplicates import smooth_images

    engine, _ = stored
    monkeypatch.setenv(access.PERSON_JOBS_ENV, "2")
    monkeypatch.setenv(access.PERSON_UPLOAD_ENV, "1")
    cfg = RunConfig(dataset="digits", epochs=1, batch_size=64)
    access.act_as(Identity("ed@lab.test", "editor"))
    first, second = create_training_run(engine, cfg), create_training_run(engine, cfg)  # queued, no worker yet
    with pytest.raises(ValueError, match=r"ed@lab.test has 2 runs running or queued, the most one person may have "
                                         r"at once \(EMBEDDING_LAB_PERSON_JOBS = 2\)"):
        create_training_run(engine, cfg)
    access.act_as(Identity("ben@lab.test", "editor"))
    assert create_training_run(engine, cfg) > second  # the limit is each person's

    import io

    from PIL import Image

    def png(image) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0]).save(buffer, "PNG")
        return buffer.getvalue()

    files = [(f"a/{i}.png", png(image)) for i, image in enumerate(smooth_images(4, seed=5))]
    import_uploads(engine, "small", files + [("b/x.png", files[0][1])])  # a few KB
    big = [("a/big.png", b"\0" * (2**20 - 1000))]
    with pytest.raises(ValueError, match=r"would pass the 1 MB a person may upload a day \(EMBEDDING_LAB_PERSON_UPLOAD_MB\)"):
        import_uploads(engine, "big", big)
    with transaction(engine) as session:
        assert session.query(Dataset).filter(Dataset.name == "big").count() == 0
        assert session.query(Run).count() == 4
    access.act_as(None)  # the command line: no limits
    monkeypatch.setenv(access.PERSON_JOBS_ENV, "many")
    create_training_run(engine, cfg)
    access.act_as(Identity("ed@lab.test", "editor"))
    with pytest.raises(ValueError, match="EMBEDDING_LAB_PERSON_JOBS must be a whole number >= 1, got 'many'"):
        create_training_run(engine, cfg)


def test_a_thread_never_told_finds_its_person_through_the_resolver():
    """A fragment's timed rerun may run in a fresh thread, where the app's script never set the
    person: it must act for the session's person, not as the machine's owner."""
    import threading

    viewer = Identity("vera@lab.test", "viewer")
    seen = []
    access.resolve_with(lambda: viewer)
    try:
        thread = threading.Thread(target=lambda: seen.append((access.current(), access.allowed("train"))))
        thread.start()
        thread.join()
        assert seen == [(viewer, False)]
        access.act_as(None)  # told: the machine's owner, whatever the resolver says
        assert access.current() is None and access.allowed("delete")
    finally:
        access.resolve_with(None)
