"""The SAE architectures as torch modules, one module each, found through the registry of their facts
(`architectures/`): an architecture's `engine` names its class here."""

from __future__ import annotations

import functools
import importlib

import torch

from ...architectures import ArchitectureOptions, architecture
from ..sparse import Kernels
from .base import SparseAutoencoder, StepContext, StepOutput


@functools.cache
def sae_class(name: str) -> type[SparseAutoencoder]:
    """The torch class of architecture `name` (ValueError naming the allowed ones otherwise)."""
    spec = architecture(name)
    module, _, cls_name = spec.engine.partition(":")
    cls = getattr(importlib.import_module(module), cls_name)
    if not (isinstance(cls, type) and issubclass(cls, SparseAutoencoder) and cls.spec is spec):
        raise TypeError(f"{spec.engine} is not the SparseAutoencoder of {name}")
    return cls


def make_sae(name: str, d_in: int, d_sae: int, options: ArchitectureOptions | None = None, **base) -> SparseAutoencoder:
    """An SAE of architecture `name` with `options` (its defaults when None); `base` for the module (dtype,
    device, kernels, encoder_init_scale; transcoder, d_out and skip for a transcoder)."""
    return sae_class(name)(d_in, d_sae, options, **base)


def sae_from_config(
    cfg, d_in: int, device: torch.device | str | None = None, d_out: int | None = None
) -> SparseAutoencoder:
    """The SAE a TrainConfig describes, freshly initialised (a transcoder of d_in to d_out where it says so)."""
    transcoder = bool(getattr(cfg, "transcoder", False))
    return make_sae(
        cfg.architecture,
        d_in,
        cfg.d_sae,
        cfg.options,
        dtype=getattr(torch, cfg.dtype),
        device=device,
        kernels=Kernels(cfg.torch_compile),
        encoder_init_scale=cfg.encoder_init_scale,
        **({"transcoder": True, "d_out": d_out, "skip": cfg.transcoder_skip} if transcoder else {}),
    )


__all__ = ["SparseAutoencoder", "StepContext", "StepOutput", "make_sae", "sae_class", "sae_from_config"]
