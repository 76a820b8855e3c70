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

A row's state (``state[slot]``, ``width`` integers):

- ``bos[K]``: codebook ``k`` is forced to stream BOS while the row's draws so
  far (``drawn``) are at most ``bos[k]`` (the processor's countdown, counted
  from where the utterance opens);
- ``drawn``: the rows drawn since;
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
(``Utterance.take``). On a CPU each operation costs its call, whatever its
rows: a step reads the rules in 7 and moves them on in 10, or by the row
kernel in one call each (``KERNEL``), which a step of a few rows pays less for.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch

from .. import rowkernel
from ..pipelining import to_device
from ..sampling import counted_window
from .utterance import MAX_RAS_WINDOW, Markers, Utterance

__all__ = ["KERNEL", "RowRules"]

Ints = npt.NDArray[np.int64]

# Whether a CPU's steps read and move the rules by the row kernel (two calls)
# rather than by torch's operations (seventeen); tests turn it off to compare.
KERNEL = True


def _kernel(state: torch.Tensor) -> rowkernel.RowKernel | None:
    """The row kernel, where it keeps the rules: ``state`` on a CPU, outside a
    trace, ``KERNEL`` on and the kernel built; else None."""
    return rowkernel.on_cpu(state) if KERNEL else None


class RowRules:
    """The rules' state of ``rows`` slots on ``device`` (``state``, at a fixed
    address until the table grows: recorded steps read it there), for a model
    of ``card`` ids per codebook, the stream markers among them."""

    def __init__(self, rows: int, markers: Markers, card: int, device: torch.device) -> None:
        self.markers = markers
        k = self.codebooks = markers.codebooks
        self.width = 3 * k + 2 + MAX_RAS_WINDOW * k
        self._last = 2 * k + 2  # where ``last`` starts; ``window`` follows it
        self.state = torch.zeros(rows, self.width, dtype=torch.int64, device=device)
        self.state[:, self._last + k :] = -1
        # A window's columns by age (the newest 0), for any width: the last W.
        self._ages = torch.arange(MAX_RAS_WINDOW - 1, -1, -1, device=device)
        # The markers are the top ids of a codebook (HiggsAudio's: its size and
        # one more): a code is one where it is at least the lower.
        low, high = sorted((markers.stream_bos, markers.stream_eos))
        if (low, high) != (card - 2, card - 1):
            raise ValueError(
                f"the stream markers ({markers.stream_bos}, {markers.stream_eos}) are not "
                f"the last two of {card} ids"
            )
        self._markers_from = low

    def grow(self, rows: int) -> None:
        """Room for ``rows`` slots, each row's state kept."""
        old = self.state
        if rows > old.shape[0]:
            self.state = old.new_zeros(rows, self.width)
            self.state[:, self._last + self.codebooks :] = -1
            self.state[: old.shape[0]] = old

    def initial(self, u: Utterance) -> Ints:
        """``[width]``: a row's state as utterance ``u`` opens (picked up from
        its codes: as it opened, moved on by the rows known, ``moved_on``)."""
        if u.opening is not None:
            return self.moved_on(self.initial(u.opening), u.taken[: u.known])
        k, m = self.codebooks, self.markers
        state = np.empty(self.width, dtype=np.int64)
        state[:k] = u.bos
        state[k] = 0
        state[k + 1 : 2 * k + 1] = u.eos
        state[2 * k + 1] = u.last == m.delay
        prompt = u.recent
        state[self._last : self._last + k] = prompt[-1] if len(prompt) else 0
        window = np.full((MAX_RAS_WINDOW, k), -1, dtype=np.int64)
        if len(prompt):
            window[-len(prompt) :] = prompt
        counted = counted_window(window, (m.stream_bos, m.stream_eos))
        state[self._last + k :] = counted.reshape(-1)
        return state

    def moved_on(self, state: Ints, rows: Sequence[Sequence[int]]) -> Ints:
        """``state`` (``[width]``) once its row has drawn ``rows`` (``[K]`` each),
        as ``take`` would leave it a row at a time, in one go on the host: the
        draws counted, each EOS countdown run once a row while a codebook had
        ended before it, the last row, and the window with the rows in it."""
        if not rows:
            return state
        k, m = self.codebooks, self.markers
        drawn = np.asarray(rows, dtype=np.int64).reshape(-1, k)
        state = state.copy()
        ended = (drawn == m.stream_eos).any(axis=1)
        delay = int(state[2 * k + 1])
        # Whether a codebook had ended before each row (the countdown it runs).
        before = np.maximum.accumulate(np.concatenate([[delay], ended[:-1]]).astype(np.int64))
        state[k] += len(drawn)
        state[k + 1 : 2 * k + 1] -= int(before.sum())
        state[2 * k + 1] = max(delay, int(ended.any()))
        state[self._last : self._last + k] = drawn[-1]
        window = state[self._last + k :].reshape(MAX_RAS_WINDOW, k)
        counted = np.where(drawn >= self._markers_from, -1, drawn)
        state[self._last + k :] = np.concatenate([window, counted])[-MAX_RAS_WINDOW:].reshape(-1)
        return state

    def reset(self, rows: Sequence[tuple[int, Ints]]) -> None:
        """Set each slot's row to its state (``initial``'s), in one write (on
        CUDA without waiting for the step in flight)."""
        if rows:
            device = self.state.device
            index = to_device(torch.tensor([slot for slot, _ in rows]), device, later=True)
            states = torch.from_numpy(np.stack([state for _, state in rows]))
            self.state[index] = to_device(states, device, later=True)

    # -- a step's part (tensor operations of static shapes) -------------------------

    def fed(self, rows: int) -> torch.Tensor:
        """``[rows, K]``: the codes each row feeds (the row it drew last)."""
        return self.state[:rows, self._last : self._last + self.codebooks]

    def forced(
        self, rows: int, ras_len: torch.Tensor, window: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What each row draws by in this step: the codes the delay pattern
        forces (-1: free), ``[rows, K]``, and its last ``ras_len`` rows
        (``[rows]``) as a repetition window ``[rows, window, K]`` (-1 elsewhere
        and for the stream markers). (A row that does not draw in the step has
        its draw ignored.)"""
        k, m = self.codebooks, self.markers
        kernel = _kernel(self.state)
        if kernel is not None:
            ids = (m.stream_bos, m.stream_eos)
            return kernel.read_rules(self.state, (rows, k, window), ras_len, ids)
        state = self.state[:rows]
        bos, drawn = state[:, :k], state[:, k : k + 1]
        eos, delay = state[:, k + 1 : 2 * k + 1], state[:, 2 * k + 1 : 2 * k + 2]
        forced = torch.where(bos >= drawn, m.stream_bos, -1)
        forced = torch.where(eos - delay <= 0, m.stream_eos, forced)
        recent = state[:, self.width - window * k :].view(rows, window, k)
        older = self._ages[MAX_RAS_WINDOW - window :] >= ras_len[:, None]
        return forced, recent.masked_fill(older[:, :, None], -1)

    def take(self, rows: int, stepped: torch.Tensor, tokens: torch.Tensor) -> None:
        """The rows that drew (``stepped``, ``[rows]`` bool) take their codes
        ``tokens`` (``[rows, K]``): their countdowns run, their last row and
        window move on."""
        k, m = self.codebooks, self.markers
        kernel = _kernel(self.state)
        if kernel is not None:
            kernel.take_rules(self.state, rows, stepped, tokens, m.stream_eos, self._markers_from)
            return
        state = self.state[:rows, k:]  # (``bos`` stays as it is)
        drawn, eos, delay = state[:, :1], state[:, 1 : k + 1], state[:, k + 1 : k + 2]
        ended = (tokens == m.stream_eos).any(dim=1, keepdim=True)
        moved = torch.cat(
            [
                drawn + 1,
                eos - delay,
                torch.maximum(delay, ended),
                tokens,
                state[:, 3 * k + 2 :],  # the window, its oldest row out
                tokens.masked_fill(tokens >= self._markers_from, -1),
            ],
            dim=1,
        )
        state.copy_(torch.where(stepped[:, None], moved, state))
