"""The speech rules on the device: each row's delay pattern, repetition window
and fed codes, kept where the step runs.

HiggsAudio v2's generation loop reads each row's last codes before the next
step: the delay pattern (``HiggsAudioV2DelayPatternLogitsProcessor``) forces
stream BOS on codebook ``k`` for the utterance's first rows and, once a
codebook has ended, stream EOS on the others one more each row; repetition-aware
sampling redraws a code repeated too often in the row's recent rows; and the
row drawn is the next step's input. ``RowRules`` keeps all of that per slot in
one int64 table on the device, and a step reads and writes it with tensor
operations of static shapes, so that the step needs nothing from the host but
which rows step, and can be launched before the last step's codes are read.

A row's state (``state[slot]``, ``WIDTH`` integers):

- ``bos[K]``: codebook ``k`` is forced to stream BOS while ``bos[k] >= 0``,
  counting down a step each time;
- ``eos[K]``: counting down every step once a codebook has ended (``delay``);
  codebook ``k`` is forced to stream EOS once ``eos[k] <= 0``;
- ``delay``: 1 once a codebook has ended (the text token fed is then the delay
  token, whose countdown the processor runs);
- ``last[K]``: the row drawn last (what the next step feeds);
- ``window[MAX_RAS_WINDOW, K]``: the last rows (the prompt's audio rows, then
  the rows drawn), oldest first, with the stream markers (and rows not there
  yet) as -1: never counted as repeats.

A row's state is set when its utterance opens (``reset``, from the host's
``Utterance``, whose countdowns are the processor's as the prompt sets them up)
and changes only in the steps in which the row draws. The host keeps each
utterance's rows, frames and stop rules from the codes it reads back
(``Utterance.take``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch

from ..sampling import counted_window
from .utterance import MAX_RAS_WINDOW, Markers, Utterance

__all__ = ["RowRules"]

Ints = npt.NDArray[np.int64]


class RowRules:
    """The rules' state of ``rows`` slots on ``device`` (``state``, at a fixed
    address until the table grows: recorded steps read it there)."""

    def __init__(self, rows: int, markers: Markers, device: torch.device) -> None:
        self.markers = markers
        k = self.codebooks = markers.codebooks
        self.width = 3 * k + 1 + MAX_RAS_WINDOW * k
        self.state = torch.zeros(rows, self.width, dtype=torch.int64, device=device)
        self.state[:, self._window] = -1

    @property
    def _window(self) -> slice:
        return slice(3 * self.codebooks + 1, self.width)

    def grow(self, rows: int) -> None:
        """Room for ``rows`` slots, each row's state kept."""
        old = self.state
        if rows > old.shape[0]:
            self.state = old.new_zeros(rows, self.width)
            self.state[:, self._window] = -1
            self.state[: old.shape[0]] = old

    def initial(self, u: Utterance) -> Ints:
        """``[WIDTH]``: a row's state as utterance ``u`` opens."""
        k, m = self.codebooks, self.markers
        state = np.empty(self.width, dtype=np.int64)
        state[:k] = u.bos
        state[k : 2 * k] = u.eos
        state[2 * k] = u.last == m.delay
        prompt = u.history[: u.prompt_rows]
        state[2 * k + 1 : 3 * k + 1] = prompt[-1] if len(prompt) else 0
        window = np.full((MAX_RAS_WINDOW, k), -1, dtype=np.int64)
        if len(prompt):
            window[-len(prompt) :] = prompt
        state[3 * k + 1 :] = counted_window(window, (m.stream_bos, m.stream_eos)).reshape(-1)
        return state

    def reset(self, rows: Sequence[tuple[int, Ints]]) -> None:
        """Set each slot's row to its state (``initial``'s), in one write."""
        if rows:
            device = self.state.device
            index = torch.tensor([slot for slot, _ in rows], device=device)
            self.state[index] = torch.from_numpy(np.stack([state for _, state in rows])).to(device)

    # -- a step's part (tensor operations of static shapes) -------------------------

    def fed(self, rows: int) -> torch.Tensor:
        """``[rows, K]``: the codes each row feeds (the row it drew last)."""
        k = self.codebooks
        return self.state[:rows, 2 * k + 1 : 3 * k + 1]

    def forced(
        self, rows: int, stepped: torch.Tensor, ras_len: torch.Tensor, window: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the rows that draw (``stepped``, ``[rows]`` bool) draw by: the
        codes the delay pattern forces (-1: free), ``[rows, K]``, and each row's
        last ``ras_len`` rows (``[rows]``) as a repetition window
        ``[rows, window, K]`` (-1 elsewhere and for the stream markers)."""
        k, m = self.codebooks, self.markers
        state = self.state[:rows]
        bos, eos, delay = state[:, :k], state[:, k : 2 * k], state[:, 2 * k]
        go = stepped[:, None]
        forced = torch.where((bos >= 0) & go, m.stream_bos, -1)
        eos = eos - (delay[:, None] * go)
        forced = torch.where((eos <= 0) & go, m.stream_eos, forced)
        recent = state[:, self.width - window * k :].view(rows, window, k)
        older = torch.arange(window, device=state.device)[None, :] < (window - ras_len)[:, None]
        return forced, recent.masked_fill(older[:, :, None], -1)

    def take(self, rows: int, stepped: torch.Tensor, tokens: torch.Tensor) -> None:
        """The rows that drew (``stepped``) take their codes ``tokens``
        (``[rows, K]``): their countdowns run, their last row and window move on."""
        k, m = self.codebooks, self.markers
        state = self.state[:rows]
        bos, eos, delay = state[:, :k], state[:, k : 2 * k], state[:, 2 * k : 2 * k + 1]
        ended = (tokens == m.stream_eos).any(dim=1, keepdim=True)
        counted = tokens.masked_fill((tokens == m.stream_bos) | (tokens == m.stream_eos), -1)
        moved = torch.cat(
            [
                bos - (bos >= 0).to(bos.dtype),
                eos - delay,
                delay | ended.to(delay.dtype),
                tokens,
                state[:, 3 * k + 1 + k :],  # the window, its oldest row out
                counted,
            ],
            dim=1,
        )
        state.copy_(torch.where(stepped[:, None], moved, state))
