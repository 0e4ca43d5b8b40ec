"""Streamlit dashboard of Flash-Serve: a live page for a running server and a page for experiment results."""
