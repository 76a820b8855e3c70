"""A MusicGen request's pattern sequences, on the host: the delay pattern and
long-form windows.

audiocraft's ``LMModel.generate`` fills a pattern sequence ``[K, S]``: codebook
``k`` of timestep ``t`` sits at the sequence step the model's pattern provider
says (the delay pattern: ``t + k + 1``), and step ``s`` feeds the column ``s - 1``
and writes column ``s``. A ``Window`` is one such run: its sequence, where it
stands, and which timesteps are complete (every codebook known) after each step,
so that their codes go to the codec as soon as they are. ``Windows`` starts a
request's windows as ``MusicGen._generate_tokens`` does, with the same lengths
(long form: each window after the first is prompted with the end of the last).

No torch here: one column of sampled codes per step comes back from the device
for all requests at once, and each request's window takes its own. A window
holds its sequence as a Python list per codebook: a step reads and writes one
code of each (four for mono MusicGen), which numpy does at a microsecond or
two a call, several times the work itself, for every stream in every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

__all__ = ["FED_TOKEN", "UNKNOWN_TOKEN", "Layout", "Window", "Windows"]

UNKNOWN_TOKEN = -1
# In a step's input column: the code the step still in flight samples for this
# codebook (pipelined steps), which the device takes from its own copy.
FED_TOKEN = -2

Codes = npt.NDArray[np.int64]


@dataclass(slots=True)
class Layout:
    """Where each timestep's codes land in the pattern sequence."""

    positions: Codes  # [K, T]: sequence step holding codebook k of timestep t
    ready_after: list[int]  # timesteps complete once sequence step s is written
    steps: list[list[int]]  # ``positions`` as lists (a step reads a few of them)


@dataclass(slots=True)
class Window:
    """One ``LMModel.generate`` run: a pattern sequence filled step by step.

    Each step writes one column of sampled codes into it (``write``), and reads
    the next step's input column from it (``last_column``).
    """

    sequence: list[list[int]]  # [K][S] pattern sequence being filled
    layout: Layout
    start_offset: int
    end_offset: int
    offset: int
    prompt_len: int  # timesteps given as prompt (known before the first step)
    ready: int = 0  # timesteps with every codebook known
    prefilled: bool = False  # its prompt is in the decoder's KV cache
    prompt_inputs: Any = None  # [2, P, D] embeddings to prefill (None once prefilled)
    prompt_fed: int = 0  # of them, positions already in the cache

    @property
    def done(self) -> bool:
        return self.offset >= self.end_offset

    def prompt(self) -> Codes:
        """The columns before the first step ``[K, offset]`` (what is prefilled)."""
        offset = self.offset
        return np.array([row[:offset] for row in self.sequence], dtype=np.int64)

    def last_column(self) -> list[int]:
        """``[K]``: the column the next step feeds."""
        at = self.offset - 1
        return [row[at] for row in self.sequence]

    def pending_column(self) -> list[int]:
        """``[K]``: the column the next step feeds while the step writing it is in
        flight (its codes not read yet): the codes already known (the prompt's,
        the special token) and ``FED_TOKEN`` where that step's sampled code
        goes, as ``write`` will put it."""
        at = self.offset
        return [FED_TOKEN if row[at] == UNKNOWN_TOKEN else row[at] for row in self.sequence]

    @property
    def ends_next(self) -> bool:
        """Whether the next ``write`` completes the window."""
        return self.offset + 1 >= self.end_offset

    def write(self, sampled: list[int]) -> list[list[int]] | None:
        """Write a step's sampled codes ``[K]`` into the next column where it is
        unknown (where the prompt already holds a code, the prompt's). The
        timesteps it completes, each one's codes ``[K]`` as ints, or None.

        ``LMModel.generate`` writes the special token where the pattern has no
        position; such positions already hold it (``Windows.start``: the
        pattern sequence is built so), never the unknown token, so writing the
        sampled codes where the column is unknown is the same."""
        offset = self.offset
        for row, code in zip(self.sequence, sampled, strict=True):
            if row[offset] == UNKNOWN_TOKEN:
                row[offset] = code
        self.offset = offset + 1
        ready = self.layout.ready_after[offset]
        if ready <= self.ready:
            return None
        first, self.ready = self.ready, ready
        steps = self.layout.steps
        return [
            [row[at[t]] for row, at in zip(self.sequence, steps, strict=True)]
            for t in range(first, ready)
        ]

    def codes(self) -> Codes:
        """Every timestep's codes ``[1, K, T]``, as ``LMModel.generate`` returns them."""
        sequence = np.array(self.sequence, dtype=np.int64)
        codes: Codes = np.take_along_axis(sequence, self.layout.positions, axis=1)[None]
        return codes


class Windows:
    """The windows of one model: its pattern provider, window length and frame rate."""

    def __init__(self, lm: Any, window: float, frame_rate: float) -> None:
        self.lm = lm
        self.window = window
        self.frame_rate = frame_rate
        self._layouts: dict[int, Layout] = {}
        self._blanks: dict[int, list[list[int]]] = {}

    def frames(self, seconds: float) -> int:
        """Whole codec frames in ``seconds``, cut down exactly as audiocraft's
        ``int(duration * frame_rate)`` does, float error included (1.234 s at 50 Hz:
        61 frames; 0.58 s: 28), so that long form extends windows as it does."""
        return int(seconds * self.frame_rate)

    def start(self, duration: float, gen_offset: int, prompt: Codes | None) -> Window:
        """A window as ``MusicGen._generate_tokens`` starts one (same lengths):
        ``duration`` seconds in all, this window from timestep ``gen_offset``, from
        ``prompt`` codes ``[1, K, n]``."""
        time_offset = gen_offset / self.frame_rate
        chunk_duration = min(duration - time_offset, self.window)
        gen_len = self.frames(chunk_duration)
        layout = self.layout(gen_len)
        prompt_len = 0 if prompt is None else int(prompt.shape[-1])
        if prompt is None:
            # (A copy of the length's blank sequence: building it costs a request
            # a fifth of a millisecond, a crowd's first step several.)
            sequence = [row[:] for row in self._blank(gen_len)]
        else:
            sequence = self._sequence(gen_len, prompt)
        # The first step holding a code of the prompt's next timestep (what
        # ``pattern.get_first_step_with_timesteps(prompt_len)`` finds by walking
        # the whole pattern: 0.25 ms a request for a 10 s window).
        start_offset = int(layout.positions[:, prompt_len].min())
        return Window(
            sequence=sequence,
            layout=layout,
            start_offset=start_offset,
            end_offset=len(sequence[0]),
            offset=start_offset,
            prompt_len=prompt_len,
            ready=prompt_len,
        )

    def resume_point(
        self, duration: float, stride: int, prompt_len: int, known: int
    ) -> tuple[int, int] | None:
        """Where a request of ``duration`` seconds (long form moving on by
        ``stride`` timesteps, from a continuation prompt of ``prompt_len``) stands
        once its first ``known`` timesteps are known: the ``gen_offset`` of the
        window that generates timestep ``known``, and the draws made before that
        window's step that writes its first code (one a step, from each window's
        first step on, as ``_generate_tokens`` runs them). None where no window
        generates it (past the end)."""
        total_len = max(1, self.frames(duration))
        gen_offset, plen, draws = 0, prompt_len, 0
        while gen_offset + plen < total_len:
            gen_len = self.frames(min(duration - gen_offset / self.frame_rate, self.window))
            layout = self.layout(gen_len)
            first = int(layout.positions[:, plen].min())
            if known < gen_offset + gen_len:
                if known < gen_offset + plen:
                    return None  # (a prompt's timestep: never generated)
                at = int(layout.positions[:, known - gen_offset].min())
                return gen_offset, draws + at - first
            draws += len(layout.ready_after) - first
            if duration <= self.window:
                return None
            plen = gen_len - stride
            gen_offset += stride
        return None

    def _sequence(self, gen_len: int, prompt: Codes | None) -> list[list[int]]:
        """The pattern sequence ``[K][S]`` of a ``gen_len`` window as
        ``LMModel.generate`` builds it: the ``prompt`` codes ``[1, K, n]`` (if
        any) where the pattern puts them, the special token where it has no
        position, unknown elsewhere."""
        lm = self.lm
        pattern = lm.pattern_provider.get_pattern(gen_len)
        gen_codes = torch.full((1, lm.num_codebooks, gen_len), UNKNOWN_TOKEN, dtype=torch.long)
        if prompt is not None:
            gen_codes[..., : int(prompt.shape[-1])] = torch.from_numpy(prompt)
        gen_sequence, _, mask = pattern.build_pattern_sequence(gen_codes, lm.special_token_id)
        if int(gen_sequence.shape[-1]) != len(pattern.layout) or bool(
            ((gen_sequence == UNKNOWN_TOKEN) & ~mask).any()
        ):
            raise RuntimeError("a pattern sequence with unknown codes off the pattern")
        sequence: list[list[int]] = gen_sequence[0].tolist()
        return sequence

    def _blank(self, gen_len: int) -> list[list[int]]:
        """A ``gen_len`` window's sequence without a prompt (cached by length:
        copy it before writing)."""
        blank = self._blanks.get(gen_len)
        if blank is None:
            blank = self._sequence(gen_len, None)
            if len(self._blanks) > 64:
                self._blanks.clear()
            self._blanks[gen_len] = blank
        return blank

    def layout(self, gen_len: int) -> Layout:
        """Where each timestep of a ``gen_len`` window lands (cached by length)."""
        layout = self._layouts.get(gen_len)
        if layout is None:
            pattern = self.lm.pattern_provider.get_pattern(gen_len)
            k = self.lm.num_codebooks
            positions = np.zeros((k, gen_len), dtype=np.int64)
            last = [0] * gen_len
            for step, coords in enumerate(pattern.layout):
                for coord in coords:
                    if coord.t < gen_len:
                        positions[coord.q, coord.t] = step
                        last[coord.t] = max(last[coord.t], step)
            ready_after = []
            done = 0
            for step in range(len(pattern.layout)):
                while done < gen_len and last[done] <= step:
                    done += 1
                ready_after.append(done)
            layout = Layout(positions, ready_after, positions.tolist())
            if len(self._layouts) > 64:
                self._layouts.clear()
            self._layouts[gen_len] = layout
        return layout
