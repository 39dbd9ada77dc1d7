"""GPU memory of what runs a model (no torch: pure arithmetic): an extraction rank, a model evaluation rank, an
inspection rank, and the model side of a training streamed from a model (StreamSource, which memory.py adds to the
SAEs' estimate)."""

from __future__ import annotations

from dataclasses import dataclass

from .memory_constants import cuda_constants


@dataclass(frozen=True)
class StreamSource:
    """What a rank of a training streamed from a model holds beside its SAEs: the model's weights and one forward
    batch (counted as an extraction's), and the mixing window of every distinct hook a member reads."""

    parameters: int
    model_dtype: str  # the dtype the weights are loaded in ("auto" already resolved)
    hidden_size: int
    heads: int
    model_batch_size: int  # contexts per forward
    context_size: int
    mixing_contexts: int
    hook_widths: tuple[int, ...]  # each distinct hook's width
    kept: bool = False  # cache_to: the writer holds up to three windows per hook (two queued, one being written)

    def terms(self) -> dict[str, int]:
        """Bytes per rank, by term (no CUDA context: the estimate it joins counts one)."""
        size = (self.model_batch_size, self.context_size, self.hidden_size, self.heads)
        model = extraction_bytes(self.parameters, self.model_dtype, *size)
        window = self.mixing_contexts * self.context_size * sum(self.hook_widths) * 4  # float32, every hook
        return {
            "model_weights": model["weights"],
            "model_forward_batch": model["forward_batch"],
            "model_attention_scores": model["attention_scores"],
            "mixing_window": 2 * window,  # the window being read and the next one
            **({"kept_windows": 3 * window} if self.kept else {}),
        }


# --- an extraction: the model's weights and one forward batch (no gradients: inference mode)
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
# Per token of the batch, the live tensors of one transformer layer in inference mode: the residual stream,
# the attention projections and output, the MLP's up/gate/down (typically 4x wide): about 16 widths. A
# generous round figure; the attention scores are counted apart (eager attention holds heads x T x T).
FORWARD_WIDTHS_PER_TOKEN = 16


def extraction_bytes(
    parameters: int, model_dtype: str, batch_size: int, context_size: int, hidden_size: int, heads: int
) -> dict[str, int]:
    """Memory of one extraction rank, by term: weights, one forward batch, attention scores, CUDA context.
    `model_dtype` is the dtype the weights are loaded in (an "auto" already resolved)."""
    width = DTYPE_BYTES.get(model_dtype, 4)
    return {
        "weights": parameters * width,
        "forward_batch": batch_size * context_size * hidden_size * FORWARD_WIDTHS_PER_TOKEN * width,
        "attention_scores": batch_size * heads * context_size * context_size * width,
        "cuda_context": cuda_constants().cuda_context_bytes,
    }


# --- a model evaluation: an extraction's terms, the next-token distributions, and the SAE
# log-probabilities [batch, T, vocab] float32 live at once: the logits, the clean run's, the current run's
LOGIT_COPIES = 3


def evaluation_bytes(
    parameters: int, model_dtype: str, batch_size: int, context_size: int, hidden_size: int, heads: int,
    vocab_size: int, d_in: int, d_sae: int,
) -> dict[str, int]:  # fmt: skip
    """Memory of one evaluation rank, by term: the model's forward as in an extraction, the next-token
    distributions of the batch, and the SAE's weights and its latents for the batch (float32)."""
    terms = extraction_bytes(parameters, model_dtype, batch_size, context_size, hidden_size, heads)
    tokens = batch_size * context_size
    terms["log_probabilities"] = tokens * vocab_size * 4 * LOGIT_COPIES
    terms["sae"] = (2 * d_in * d_sae + d_sae + d_in) * 4 + tokens * d_sae * 4 * 2
    return terms


# --- an inspection: the SAE, one chunk's dense latents and their temporaries, the kept examples
INSPECT_CHUNK_COPIES = 4  # latents, the active mask, top-k over the chunk, the histogram's gathered values


def inspection_bytes(d_in: int, d_sae: int, chunk_rows: int, top_k: int, window: int) -> dict[str, int]:
    """Memory of one inspection rank, by term (float32 weights and latents)."""
    return {
        "sae": (2 * d_in * d_sae + d_sae + d_in) * 4,
        "chunk": chunk_rows * (d_in + d_sae * INSPECT_CHUNK_COPIES) * 4,
        "examples": 2 * top_k * d_sae * (8 + window * 12),  # kept and new: value+row, window acts and rows
        "cuda_context": cuda_constants().cuda_context_bytes,
    }
