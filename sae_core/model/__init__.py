"""Language models: Hugging Face models and tokenizers from disk, hooks, the extraction loop and its entry.

torch and transformers live here (and torch in engine/); the gate and the pages reach this package only
through its entry (`python -m sae_core.extract`) and the `hooks` command. Import from the modules.
"""
