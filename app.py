"""SAE Lab web app: access gate, sidebar (launcher, lab folder, GPUs) and the page router.

Run with `streamlit run app.py` (or `make run`). The pages live in views/ and are thin views
over sae_core; nothing here talks to NVML or starts training directly, and nothing the app process
imports for the shell, Monitor or Jobs loads torch (tests/app/test_torch_free.py).

Why views/ and not pages/: Streamlit (1.67) treats a `pages/` folder beside the main script as a
v1 multipage app whatever st.navigation says, and serves /jobs by running pages/jobs.py alone,
skipping this script and so the password gate and the sidebar.
"""

from __future__ import annotations

import os
import time

import streamlit as st

from sae_core import access, db, paths
from sae_core.gpu.history import latest_probe
from sae_core.jobs import daemon_control
from sae_core.ui.html import badge, md_text
from sae_core.ui.labels import gpu_summary

st.set_page_config(page_title="SAE Lab", page_icon=":material/neurology:", layout="wide")


def _secret(name: str):
    return st.secrets.get(name)


def sign_in_page() -> None:
    st.title("SAE Lab")
    with st.form("login", border=False):
        given = st.text_input("Password", type="password", key="login_password")
        submitted = st.form_submit_button("Enter", type="primary")
    if submitted:
        if access.password_matches(given or "", st.session_state["expected_password"]):
            st.session_state["authenticated"] = True
            del st.session_state["expected_password"]
            st.rerun()
        st.error("Wrong password.")


def password_gate() -> None:
    """When SAE_LAB_PASSWORD is set, nothing renders until this browser session has given it.

    The locked app still routes through st.navigation, with the sign-in page as its only page, so any
    URL (/jobs, /train, ...) lands on the sign-in page."""
    expected = access.configured_password(os.environ, _secret)
    if expected is None or st.session_state.get("authenticated"):
        return
    st.session_state["expected_password"] = expected
    st.navigation([st.Page(sign_in_page, title="Sign in", icon=":material/lock:")], position="hidden").run()
    st.stop()


def start_launcher() -> None:
    st.session_state["launcher_started"] = daemon_control.ensure_daemon(paths.lab_home())


def sidebar() -> None:
    home = paths.lab_home()
    engine = db.get_engine(home)  # first run: creates lab.db and its tables
    # Start the daemon once per browser session; after that only the button starts it,
    # so a launcher stopped on purpose is not restarted on every rerun.
    if "launcher_autostart" not in st.session_state:
        st.session_state["launcher_autostart"] = True
        start_launcher()
    status = daemon_control.daemon_status(home)
    with st.sidebar:
        st.markdown("**Launcher**")
        if status.running and status.healthy:
            st.markdown(badge(f"running · pid {status.pid}", "green"))
        elif status.running:
            st.markdown(badge("not responding", "orange"))
            st.caption(md_text(status.message))
        else:
            st.markdown(badge("not running", "red"))
            st.caption("Queued jobs start only while the launcher runs.")
            st.button("Start launcher", key="start_launcher", on_click=start_launcher, icon=":material/play_arrow:")
        probe = latest_probe(engine)
        st.markdown("**GPUs**")
        st.caption(md_text(gpu_summary(probe, now=time.time())))
        st.markdown("**SAE_LAB_HOME**")
        st.caption(md_text(home))


password_gate()
sidebar()
navigation = st.navigation(
    [
        st.Page("views/home.py", title="Home", icon=":material/home:", default=True),
        st.Page("views/monitor.py", title="Monitor", icon=":material/monitoring:"),
        st.Page("views/train.py", title="Train", icon=":material/model_training:"),
        st.Page("views/jobs.py", title="Jobs", icon=":material/list_alt:"),
        st.Page("views/saes.py", title="SAEs", icon=":material/download:"),
    ]
)
navigation.run()
