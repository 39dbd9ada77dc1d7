"""SAE Lab web app: access gate, sidebar (launcher, lab folder, GPUs) and the page router.

Run with `streamlit run app.py` (or `make run`). The pages live in views/ and are thin views
over sae_core; nothing here talks to NVML or starts training directly, and nothing the app process
imports for the shell, Monitor or Jobs loads torch (tests/app/test_torch_free.py).

Why views/ and not pages/: Streamlit (1.67) treats a `pages/` folder beside the main script as a
v1 multipage app whatever st.navigation says, and serves /jobs by running pages/jobs.py alone,
skipping this script and so the password gate and the sidebar.
"""

from __future__ import annotations

import math
import os
import sys
import time
import traceback

import streamlit as st

from sae_core import access, db, paths
from sae_core.db import LabDatabaseError
from sae_core.db.health import DATABASE_ERRORS, as_lab_error
from sae_core.gpu.history import latest_probe
from sae_core.jobs import daemon_control
from sae_core.ui.html import badge, md_text
from sae_core.ui.labels import gpu_summary

st.set_page_config(page_title="SAE Lab", page_icon=":material/neurology:", layout="wide")
paths.use_private_files()  # lab.db and the launcher this app starts create private files


def _secret(name: str):
    return st.secrets.get(name)


# The pages, and the URL path each is served at (`/jobs` for views/jobs.py; Home at `/`).
PAGES = [
    ("views/home.py", "Home", ":material/home:"),
    ("views/monitor.py", "Monitor", ":material/monitoring:"),
    ("views/extract.py", "Extract", ":material/input:"),
    ("views/train.py", "Train", ":material/model_training:"),
    ("views/jobs.py", "Jobs", ":material/list_alt:"),
    ("views/saes.py", "SAEs", ":material/download:"),
    ("views/explore.py", "Explore", ":material/travel_explore:"),
]


def sign_in_page() -> None:
    st.title("SAE Lab")
    with st.form("login", border=False):
        given = st.text_input("Password", type="password", key="login_password")
        submitted = st.form_submit_button("Enter", type="primary")
    if not submitted:
        return
    # Streamlit's address is None on loopback (and not a string under AppTest); X-Forwarded-For counts only from
    # a configured proxy (SAE_LAB_TRUSTED_PROXIES), or nobody could be held to the back-off below.
    forwarded = st.context.headers.get("X-Forwarded-For")
    client = access.client_address(st.context.ip_address, forwarded, access.trusted_proxies(os.environ))
    wait = access.THROTTLE.wait_s(client)
    if wait > 0:
        st.error(f"Too many wrong passwords: try again in {math.ceil(wait):d} s.")
    elif access.password_matches(given or "", st.session_state["expected_password"]):
        access.THROTTLE.succeeded(client)
        st.session_state["authenticated"] = True
        del st.session_state["expected_password"]
        st.rerun()  # the same URL, now with the real pages: a deep link lands where it pointed
    else:
        access.THROTTLE.failed(client)
        st.error("Wrong password.")


def password_gate() -> None:
    """When SAE_LAB_PASSWORD is set, nothing renders until this browser tab has given it (Streamlit keeps
    no cookie: a reload or a new tab asks again).

    The locked app routes every page's URL (/jobs, /train, ...) to the sign-in page, so a deep link is not
    "page not found" and, once signed in, opens the page it named."""
    expected = access.configured_password(os.environ, _secret)
    if expected is None or st.session_state.get("authenticated"):
        return
    st.session_state["expected_password"] = expected
    locked = [
        st.Page(sign_in_page, title="Sign in", icon=":material/lock:", url_path=url_path(script), default=i == 0)
        for i, (script, _, _) in enumerate(PAGES)
    ]
    st.navigation(locked, position="hidden").run()
    st.stop()


def url_path(script: str) -> str:
    return "" if script == PAGES[0][0] else script.removeprefix("views/").removesuffix(".py")


@st.cache_resource(show_spinner=False)
def warn_if_exposed() -> None:
    """Once per server process: say so when anyone on the network can use the app."""
    warning = access.exposure_warning(st.get_option("server.address"), access.configured_password(os.environ, _secret))
    for said in (warning, access.proxy_warning(os.environ)):
        if said:
            print(f"warning: {said}", file=sys.stderr, flush=True)


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


def database_problem_page(problem: LabDatabaseError) -> None:
    """The one page shown while lab.db cannot be used: what is wrong, what was saved, what to do."""
    st.title("SAE Lab cannot open its database")
    st.error(md_text(problem, multiline=True), icon=":material/database:")
    st.caption("Nothing else is shown until it is fixed; reload this page afterwards.")


warn_if_exposed()
password_gate()
# Every database error of every page ends here, as the one page that says what is wrong (a part of a page that
# refreshes itself reruns the whole app on one: views/widgets.live_fragment). The page renders into `body`,
# so what it drew before the error goes.
body = st.empty()
try:
    sidebar()
    navigation = st.navigation(
        [st.Page(script, title=title, icon=icon, default=i == 0) for i, (script, title, icon) in enumerate(PAGES)]
    )
    with body.container():
        navigation.run()
except DATABASE_ERRORS as problem:
    if not isinstance(problem, LabDatabaseError):  # unexpected: its traceback goes to the server's log only
        traceback.print_exception(problem, file=sys.stderr)
    body.empty()
    database_problem_page(as_lab_error(paths.db_path(), problem))
