"""Sign-in and roles (core.access): with an [auth] section in the app's secrets, a person signs in
with Streamlit's st.login (any OpenID Connect provider) and gets the role the secrets' [roles]
table gives their email; without one, the app is one person's on their own machine, and says so
once. EMBEDDING_LAB_DEMO (environment or secrets) makes it read-only for everyone.

    [auth]
    redirect_uri = "https://your-app.example.org/oauth2callback"
    cookie_secret = "a long random string"
    client_id = "..."
    client_secret = "..."
    server_metadata_url = "https://your-provider/.well-known/openid-configuration"

    [roles]
    admins = ["ada@example.org"]
    editors = ["ben@example.org"]
    viewers = ["*"]        # "*": anyone the provider signs in

app.py calls `gate()` before every page: for someone not signed in (or without a role) it draws the
sign-in instead of the page, and it sets who this script run acts for, which every service that
writes checks.
"""
from __future__ import annotations

from typing import Optional

import streamlit as st

from core import access
from pages.common import use_secrets

ROLE_LISTS = {"admins": "admin", "editors": "editor", "viewers": "viewer"}


def auth_configured() -> bool:
    return bool(st.secrets.load_if_toml_exists() and "auth" in st.secrets)


def role_of(email: Optional[str]) -> Optional[str]:
    """The highest role the secrets' [roles] table gives `email` (compared without case); None
    for an email it does not name ("*" in a list names everyone)."""
    table = st.secrets.get("roles", {}) if st.secrets.load_if_toml_exists() else {}
    wanted = (email or "").strip().lower()
    for key, role in ROLE_LISTS.items():
        members = [str(m).strip().lower() for m in table.get(key, [])]
        if wanted and (wanted in members or "*" in members):
            return role
    return None


SESSION_KEY = "_embedding_lab_identity"


def _act(identity: Optional[access.Identity]) -> None:
    """This run's person, kept in the session too: a fragment's timed rerun in another thread
    finds it there (core.access.resolve_with)."""
    st.session_state[SESSION_KEY] = identity
    access.act_as(identity)
    access.resolve_with(_session_identity)


def _session_identity() -> Optional[access.Identity]:
    """The person of the session whose script (or fragment) runs in this thread; None (the
    machine's owner) in a thread of no session, where no page's request runs."""
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    if get_script_run_ctx() is None:
        return None
    return st.session_state.get(SESSION_KEY)


def gate() -> bool:
    """Whether the page may run: False when this drew the sign-in (or the refusal) instead."""
    use_secrets()
    demo = access.demo_mode()
    if not auth_configured():
        _act(access.Identity(None, "viewer", demo=True) if demo else None)
        if demo:
            st.sidebar.caption(":material/visibility: A read-only demo: explore, search and compare.")
        elif not st.session_state.get("told-no-sign-in"):
            st.session_state["told-no-sign-in"] = True
            st.toast("No sign-in is set up, so whoever can open this app can do everything in it. Add an [auth] "
                     "section to its secrets to let people sign in with roles (README: Deploying).", icon="🔓")
        return True
    if not st.user.is_logged_in:
        _act(access.Identity(None, "viewer", demo=True))  # nothing may be written before sign-in
        st.title("Embedding Lab")
        st.write("Sign in to explore, search and compare the lab's runs.")
        st.button("Sign in", on_click=st.login, type="primary")
        return False
    email = st.user.get("email") or st.user.get("sub")
    role = role_of(email)
    if role is None:
        _act(access.Identity(None, "viewer", demo=True))
        st.error(f"{email} may not use this app: the app's roles do not name it. Ask one of its admins to add it.")
        st.button("Sign out", on_click=st.logout)
        return False
    _act(access.Identity(email, role, demo=demo))
    with st.sidebar:
        st.caption(f"Signed in as **{email}** ({role}" + (", read-only demo)" if demo else ")"))
        st.button("Sign out", on_click=st.logout, key="sign-out")
    return True


def can(action: str, owner: Optional[str] = None) -> bool:
    """Whether this script run's person may do `action` (core.access): for hiding what they may not."""
    return access.allowed(action, owner)


def why_not(action: str) -> str:
    try:
        access.require(action)
    except access.Forbidden as exc:
        return str(exc)
    return ""
