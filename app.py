"""SAE Lab web app (landing page; the full router arrives with the pages)."""

import streamlit as st

st.set_page_config(page_title="SAE Lab", layout="wide")
st.title("SAE Lab")
st.write("Train sparse autoencoders on language-model activations across the GPUs of this workstation.")
