"""`python -m sae_core COMMAND`: one module per command group; the logic they call lives in the library."""
