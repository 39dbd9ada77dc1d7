"""The public SAE API (a contract: `from sae_core.sae import load`): load, save and build SAEs."""

from .engine.saelens import load, save
from .engine.saes import SparseAutoencoder, make_sae

__all__ = ["SparseAutoencoder", "load", "make_sae", "save"]
