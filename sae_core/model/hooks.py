"""Hooks: which modules of a model can be read, and reading one while running the model only up to it.

A hook is a module path (`model.layers.12`, `transformer.h.6.mlp`, `encoder.layer.2`); its activation is
the module's output, or the first tensor of a tuple output. `run_to_hook` stops the forward pass right
after that module (a forward hook raises), so the layers after it cost nothing.
"""

from __future__ import annotations

import contextlib
import difflib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..text import brief
from .loading import ModelError, meta_model

CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")  # the classes that predict the next token
_PROBE_TOKENS = 8  # a [1, 8] forward on the meta device gives every module's output shape


@dataclass(frozen=True)
class HookInfo:
    path: str
    module: str  # class name
    width: int  # last dimension of the output: the activation's d_in

    def to_dict(self) -> dict:
        return {"path": self.path, "module": self.module, "width": self.width}


def first_tensor(output) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return getattr(output, "last_hidden_state", None)


def find_module(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """The module at `path`, or ModelError naming the closest paths that exist."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [name for name, _ in model.named_modules() if name]
        close = difflib.get_close_matches(path, names, n=5, cutoff=0.5)
        hint = (
            f"; close: {', '.join(close)}" if close else f"; it has {len(names)} modules, e.g. {', '.join(names[:5])}"
        )
        raise ModelError(
            f"hook: {brief(path, 100)!r} is not a module of this model{hint} (`python -m sae_core hooks MODEL` "
            "lists them all)"
        ) from None


def list_hooks(model_dir: Path) -> list[HookInfo]:
    """Every module whose output is a [batch, tokens, width] tensor, in model order, with that width.
    Traced on the meta device: no weights are loaded."""
    model = meta_model(model_dir)
    shapes: dict[str, tuple[str, tuple[int, ...]]] = {}

    def recorder(name: str, module: torch.nn.Module):
        def record(_module, _inputs, output):
            tensor = first_tensor(output)
            if tensor is not None and tensor.dim() == 3 and tuple(tensor.shape[:2]) == (1, _PROBE_TOKENS):
                shapes.setdefault(name, (type(module).__name__, tuple(tensor.shape)))

        return record

    handles = [m.register_forward_hook(recorder(n, m)) for n, m in model.named_modules() if n]
    try:
        with torch.inference_mode():
            model(input_ids=torch.zeros(1, _PROBE_TOKENS, dtype=torch.long, device="meta"))
    except Exception as exc:  # noqa: BLE001  (a model whose forward does not trace on meta)
        raise ModelError(f"model: its forward pass could not be traced to list hooks ({brief(exc, 160)})") from None
    finally:
        for handle in handles:
            handle.remove()
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return [HookInfo(n, kind, shape[-1]) for n, (kind, shape) in sorted(shapes.items(), key=lambda x: order[x[0]])]


def model_facts(model_dir: Path) -> dict:
    """What the gate needs to know of a model without torch: its folder, class, parameter count, saved dtype."""
    model = meta_model(model_dir)
    config = model.config
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    return {
        "model_dir": str(model_dir),
        "class": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(dtype).removeprefix("torch."),
        "hidden_size": getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0),
        "heads": getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 0),
        "vocab_size": getattr(config, "vocab_size", 0) or 0,
        "causal_lm": type(model).__name__.endswith(CAUSAL_LM_SUFFIXES),
    }


class _ReachedHook(Exception):
    """Raised by the forward hook to stop the model right after the hooked module."""


class HookReader:
    """Runs a model up to one module and returns that module's output; nothing after it is computed."""

    def __init__(self, model: torch.nn.Module, path: str):
        self.model = model
        self.module = find_module(model, path)
        self._output: torch.Tensor | None = None
        self._handle = self.module.register_forward_hook(self._capture)

    def _capture(self, _module, _inputs, output):
        tensor = first_tensor(output)
        if tensor is None:
            raise ModelError(f"hook: the module's output is a {type(output).__name__}, not a tensor")
        self._output = tensor
        raise _ReachedHook

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[batch, tokens, width] at the hook for `input_ids` [batch, tokens]."""
        self._output = None
        with contextlib.suppress(_ReachedHook):
            self.model(input_ids=input_ids)
        if self._output is None:
            raise ModelError("hook: the module was not run by the model's forward pass")
        output, self._output = self._output, None
        return output

    def close(self) -> None:
        self._handle.remove()
