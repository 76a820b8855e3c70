"""One text chunk's utterance, on the host: the delay pattern and the stop rules.

HiggsAudio v2 speaks in rows of ``K`` codes, codebook ``k`` ``k`` rows late (the
delay pattern): an utterance opens with rows where codebooks still wait at
stream BOS and closes with rows where they have ended at stream EOS. An
``Utterance`` keeps what ``generate``'s loop keeps for one chunk, as plain
integers: the prompt's tokens and audio rows, the delay pattern's countdowns as
the prompt sets them up (``HiggsAudioV2DelayPatternLogitsProcessor``'s; the
steps run them on the device: ``rules.RowRules``), the text token each row is
fed with, and the rows spoken. A step gives it the row drawn (``take``: the
stop rules), and reads the frame that row completes (``frame``). The next
chunk's prompt repeats this one's prompt and answer: ``reusable`` says how much
of the row's KV cache stays valid.

A stream picked up from its codes (``generate.resume_codes``) opens its chunk
under way: the rows it had drawn go into the prompt (``picked_up``: prefilled
with it), and the rules start where those rows left them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["MAX_RAS_WINDOW", "Markers", "Utterance"]

MAX_RAS_WINDOW = 64

Ints = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class Markers:
    """The ids the rules read: audio stream markers and text tokens."""

    codebooks: int
    stream_bos: int  # an audio codebook not started yet
    stream_eos: int  # an audio codebook ended
    audio: int  # <|AUDIO_OUT|>: the text token of an audio row
    delay: int  # the text token of a row where a codebook has ended
    audio_bos: int  # <|audio_out_bos|>
    end: int  # end of turn (every codebook ended)


@dataclass(slots=True)
class Utterance:
    """One chunk's prompt and decoding state.

    The delay pattern's countdowns as the utterance opens mirror
    ``HiggsAudioV2DelayPatternLogitsProcessor``'s: ``bos[k] >= 0`` forces
    codebook ``k`` to stream BOS (the first rows of an utterance), ``eos[k] <= 0``
    to stream EOS (counting down once a codebook has ended, so that codebook
    ``k`` ends ``k`` rows after the first); ``RowRules`` runs them.
    """

    markers: Markers
    ids: Ints  # [L] the prompt's tokens
    audio: Ints  # [N, K] its audio rows (delay-pattern blocks)
    is_audio: npt.NDArray[np.bool_]  # [L] which positions are audio
    fed: int  # prompt positions in the row's cache
    bos: Ints  # [K], as the utterance opens
    eos: Ints  # [K], as the utterance opens
    last: int  # the last text token (audio, delay, or end of turn)
    recent: Ints  # [P, K]: the prompt's last audio rows (at most the RAS window)
    # Every row taken, as lists: a step writes a row and reads a frame (a
    # diagonal of the last K rows) for every stream, which numpy would do at a
    # microsecond or more a call on rows this small.
    taken: list[list[int]]
    generated: int = 0  # rows taken that are audio (all but an all-EOS last one)
    forwarded: int = 0  # generated rows fed back (in the cache)
    steps: int = 0
    ended: bool = False
    # Picked up: the first ``known`` rows taken are in the prompt, which the
    # utterance as it opened (``opening``) did not hold.
    known: int = 0
    opening: Utterance | None = None

    @classmethod
    def start(cls, ids: Ints, audio: Ints, markers: Markers) -> Utterance:
        """The utterance a prompt's tokens ``[L]`` and audio rows ``[N, K]`` open,
        with the delay pattern the processor sets up from the prompt's last K
        tokens."""
        k = markers.codebooks
        pattern = np.arange(1, k + 1, dtype=np.int64)
        tail = ids[-k:]
        bos_at = np.flatnonzero(tail == markers.audio_bos)
        eos_at = np.flatnonzero(tail == markers.delay)
        bos = pattern - (len(tail) - bos_at[0]) if bos_at.size else np.zeros(k, np.int64)
        eos = pattern - (len(tail) - eos_at[0]) if eos_at.size else pattern.copy()
        return cls(
            markers=markers,
            ids=ids,
            audio=audio,
            is_audio=(ids == markers.audio) | (ids == markers.delay),
            fed=0,
            bos=bos,
            eos=eos,
            last=int(ids[-1]),
            recent=audio[-MAX_RAS_WINDOW:],
            taken=[],
        )

    @property
    def rows(self) -> Ints:
        """``[generated, K]``: the audio rows generated."""
        rows = np.array(self.taken[: self.generated], dtype=np.int64)
        return rows.reshape(self.generated, self.markers.codebooks)

    def picked_up(self, rows: list[list[int]]) -> Utterance:
        """This utterance, as it opens, once ``rows`` (``[K]`` each, none ending
        it) are taken: a stream picked up from its codes. The rows join the
        prompt, behind the text token each was fed with, so that its prefill
        puts them in the row's cache; the next row is drawn from its last
        position's logits, as an utterance's first is."""
        u = dataclasses.replace(self, taken=[], opening=self)
        fed = []
        for row in rows:
            if u.take(list(row), len(rows) + 1):
                raise ValueError("a row known before the pick-up ends the utterance")
            fed.append(u.last)
        u.ended = False
        u.known = len(rows)
        if rows:
            u.ids = np.concatenate([self.ids, np.asarray(fed, dtype=np.int64)])
            u.audio = np.concatenate([self.audio, np.asarray(rows, dtype=np.int64)])
            u.is_audio = np.concatenate([self.is_audio, np.ones(len(rows), dtype=np.bool_)])
        return u

    def reusable(self, old: Utterance) -> int:
        """Positions of this prompt that the row's cache holds from ``old``: its
        prompt, and the generated rows fed back as far as this prompt repeats
        them."""
        length, rows = len(old.ids), len(old.audio)
        if old.fed != length or len(self.audio) == 0:
            return 0
        if len(self.ids) <= length + old.forwarded or not np.array_equal(
            self.ids[:length], old.ids
        ):
            return 0
        if not np.array_equal(self.audio[:rows], old.audio):
            return 0
        same = 0
        if old.forwarded:
            # (The rows fed back follow those in the prompt: ``picked_up``.)
            generated = old.rows[old.known : old.known + old.forwarded]
            upcoming = self.audio[rows : rows + old.forwarded]
            if upcoming.shape == generated.shape:
                same = int(np.cumprod((upcoming == generated).all(axis=1)).sum())
        if not bool(self.is_audio[length : length + same].all()):
            return 0
        return length + same

    def take(self, tokens: list[int], max_new_tokens: int) -> bool:
        """A sampled row ``[K]``, as ``generate``'s loop takes it: the next text token
        (delay once a codebook has ended, end of turn once all have), the rows
        taken, the stop rules. Returns whether all codebooks ended (the row is
        not audio)."""
        m = self.markers
        ended = tokens.count(m.stream_eos)
        all_eos = ended == m.codebooks
        self.last = m.delay if ended or self.last == m.delay else m.audio
        if all_eos:
            self.last = m.end
        self.taken.append(tokens)
        self.steps += 1
        self.ended = all_eos or self.steps >= max_new_tokens
        if not all_eos:
            self.generated += 1
        return all_eos

    def frame(self) -> list[int] | None:
        """The frame ``[K]`` the last row completed (codes clipped to the codebook),
        or None: ``rows[0]`` is the all-BOS row, and frame ``j`` needs rows
        ``1 + j`` to ``1 + j + K - 1``, codebook ``k`` from row ``1 + j + k``."""
        k = self.markers.codebooks
        if self.generated - 1 < k:
            return None
        # Row 1 + j + i of the generated, codebook i: a diagonal of the last k rows.
        # (A code is a token's index: never below 0.)
        top = self.markers.stream_bos - 1
        rows = self.taken
        first = len(rows) - k
        return [min(rows[first + i][i], top) for i in range(k)]
