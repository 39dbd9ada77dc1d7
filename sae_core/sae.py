"""The public SAE API (a contract: `from sae_core.sae import load`): load, save and build SAEs."""

from .engine.sae import SparseAutoencoder, make_sae
from .engine.saelens import load, save

__all__ = ["SparseAutoencoder", "load", "make_sae", "save"]
