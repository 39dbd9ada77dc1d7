"""Home: what SAE Lab is, where its files live, and a one-click toy dataset for a first run."""

from __future__ import annotations

import streamlit as st

from sae_core import paths
from sae_core.data.catalog import TOY_DEFAULTS, list_datasets
from sae_core.files import TOY_FILE
from sae_core.ui.html import md, md_text

st.title("SAE Lab")
st.write(
    "Train sparse autoencoders on language-model activations across the GPUs of this workstation: "
    "watch the GPUs on **Monitor**, queue a run on **Train**, follow it on **Jobs**, and download "
    "the result on **SAEs**. Runs keep going when this page is closed."
)

datasets_dir = paths.datasets_dir()
datasets = list_datasets(datasets_dir)

st.subheader("Datasets")
if datasets:
    st.write(md("{} activation set(s) in {}:", len(datasets), datasets_dir))
    st.markdown("\n".join(f"- {md_text(p.name)}" for p in datasets))
else:
    st.info(
        md("No activation sets in {} yet. ", datasets_dir)
        + "Put `.safetensors` / `.npy` files (or shard folders) there, or create a small toy set to try SAE Lab "
        "in a minute."
    )

toy = TOY_DEFAULTS
toy_path = datasets_dir / TOY_FILE
if not toy_path.exists():
    st.caption(
        md("Toy set: {tokens:,} tokens of d_in {d_in}, built from {features} sparse ", **toy)
        + "ground-truth features, so the trained SAE can be scored against them."
    )
    if st.button("Create toy dataset", key="create_toy", type="primary", icon=":material/add:"):
        from sae_core.data.toy import write_toy  # torch (the toy's sparse mixing), only when asked for

        with st.spinner("Writing the toy dataset…"):
            write_toy(toy_path, **toy)
        st.success(f"Created {md_text(toy_path)}.")
        st.page_link("views/train.py", label="Train an SAE on it", icon=":material/arrow_forward:")

st.subheader("Command line")
st.code(
    "python -m sae_core gpus                      # GPUs, their processes, host figures\n"
    "python -m sae_core submit --config cfg.json --gpus 0,1\n"
    "python -m sae_core jobs                      # the same queue as the Jobs page",
    language="bash",
)
