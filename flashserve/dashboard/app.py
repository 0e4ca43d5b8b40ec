"""Flash-Serve dashboard, a Streamlit app with a live server page and an experiment results page.

Run it with `flashserve dashboard`, or directly:

    python -m streamlit run flashserve/dashboard/app.py -- --server http://127.0.0.1:8000 --results results/

Without `--server` and `--results` it reads FLASHSERVE_SERVER_URL and FLASHSERVE_RESULTS_DIR,
then falls back to http://127.0.0.1:8000 and results/.
"""

import sys
from pathlib import Path

import streamlit as st

from flashserve.dashboard.settings import normalize_server_url, parse_settings

st.set_page_config(page_title="Flash-Serve", layout="wide")

settings = parse_settings(sys.argv[1:])
st.session_state.setdefault("server_url_input", settings.server_url)
st.session_state.setdefault("results_dir_input", settings.results_dir)

views = Path(__file__).resolve().parent / "views"
page = st.navigation([
    st.Page(views / "live.py", title="Live server", default=True),
    st.Page(views / "results.py", title="Results"),
])

with st.sidebar:
    server_url = st.text_input("Server URL", key="server_url_input")
    results_dir = st.text_input("Results folder", key="results_dir_input")
st.session_state["server_url"] = normalize_server_url(server_url or settings.server_url)
st.session_state["results_dir"] = results_dir.strip() or settings.results_dir

page.run()
