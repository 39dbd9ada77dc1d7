"""Where a training streamed from a model reads its rows: a pure function of the contexts and the config (no torch).

The text is packed into contexts (as an extraction packs them) until they hold every row the run needs: one
global batch per step plus the holdout. The contexts are shuffled with the seed; the first ones, as many as the
holdout needs, are held out (chosen up front, never trained on: the end-of-run evaluation and the model
evaluation run them); the rest are cut into windows of `mixing_contexts`. The rows of a window (every kept
position of its contexts, in context order) are shuffled together with a permutation drawn from (seed, window),
and the run's row stream is the windows' shuffled rows one after another: global batch b is rows
[b * batch_size, (b + 1) * batch_size) of that stream. So the batches depend only on the model, the text, the
seed and the batch sizes, never on the number of ranks, and a position in the stream (a row count) is the whole
state a checkpoint needs to resume it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_STREAM_PLAN = 6  # the seed's stream for the context shuffle (order.py uses 1, 2, 4; the toy set 3; extraction 5)
_WINDOW_SHUFFLE = 7  # the seed's stream for each window's row permutation


@dataclass(frozen=True)
class StreamPlan:
    context_rows: np.ndarray  # int64 [n_contexts]: kept rows of each context (in the packed order)
    holdout: np.ndarray  # context ids held out, in the order their rows are evaluated
    windows: list[np.ndarray]  # context ids of each training window
    seed: int

    @property
    def holdout_rows(self) -> int:
        return int(self.context_rows[self.holdout].sum())

    def window_rows(self, index: int) -> int:
        return int(self.context_rows[self.windows[index]].sum())

    def window_starts(self) -> np.ndarray:
        """The stream position (row) at which each window starts, and the stream's length last."""
        per_window = [self.window_rows(i) for i in range(len(self.windows))]
        return np.concatenate([[0], np.cumsum(per_window, dtype=np.int64)]).astype(np.int64)

    def permutation(self, index: int) -> np.ndarray:
        """The order in which window `index`'s rows (in context order) enter the stream."""
        return np.random.default_rng([self.seed, _WINDOW_SHUFFLE, index]).permutation(self.window_rows(index))


def rows_needed(batch_size: int, total_steps: int, holdout_tokens: int) -> int:
    return batch_size * total_steps + holdout_tokens


def plan_stream(kept: np.ndarray, holdout_tokens: int, mixing_contexts: int, seed: int) -> StreamPlan:
    """The plan for contexts whose kept positions are `kept` (bool [n_contexts, context_size])."""
    rows = kept.sum(axis=1).astype(np.int64)
    order = np.random.default_rng([seed, _STREAM_PLAN]).permutation(len(rows))
    held = int(np.searchsorted(np.cumsum(rows[order]), holdout_tokens) + 1) if holdout_tokens else 0
    train = order[held:]
    windows = [train[i : i + mixing_contexts] for i in range(0, len(train), mixing_contexts)]
    return StreamPlan(rows, order[:held], windows, seed)


def window_of(starts: np.ndarray, position: int) -> int:
    """The window holding stream row `position` (`starts` from StreamPlan.window_starts)."""
    return int(np.searchsorted(starts, position, side="right") - 1)
