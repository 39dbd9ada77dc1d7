"""Language models: Hugging Face models and tokenizers from disk, hooks, text datasets, the extraction loop.

torch and transformers live here (and in engine/); the gate and the pages reach this package only through
its entry (`python -m sae_core.extract`) and the `hooks` command. Import from the modules.
"""
