"""Engine outputs -> protocol messages (PROTOCOL.md §4.4-§4.7).

One ``RequestOutputs`` per request: its audio chunks with their ``seq`` and
``offset`` (at the rate the request asked for, resampled as they come),
progress at most every 1% and every ``PROGRESS_INTERVAL`` (and on a stage
change, and at the end), an alternative rendition in chunks of a second, and
the closing ``done`` with its stats. The scheduler decides what happens to a
request; this module only says it in the protocol's words.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from wavecast.protocol import (
    Audio,
    Caption,
    Done,
    ErrorInfo,
    ModelInfo,
    Progress,
    ServerMessage,
    Stats,
    Waiting,
    WavecastError,
)
from wavecast.protocol.messages import AudioFormat, DoneStatus

from .audio import Resampler, resample, resampled_from, to_pcm
from .engines.base import FloatAudio, StepOutput

__all__ = ["PROGRESS_INTERVAL", "RequestOutputs", "done_message", "progress_due"]

# Seconds between two progress messages of a stage, at least: a stream many times
# faster than real time would otherwise send one every few steps, and each one
# wakes the event loop and the client (bench/RESULTS.md: the event loop's CPU time
# over the same runs fell from 0.60 s to 0.24 s with this bound).
PROGRESS_INTERVAL = 0.05


def progress_due(fraction: float, last: float, last_at: float, now: float) -> bool:
    """Whether a stage's progress at ``fraction`` goes out ``now``, the last one
    sent at ``last`` when ``last_at``: at least 1% and ``PROGRESS_INTERVAL`` on."""
    return fraction - last >= 0.01 and now - last_at >= PROGRESS_INTERVAL


@dataclass(slots=True)
class RequestOutputs:
    """The messages of one request's stream, and what they must remember."""

    request_id: str
    info: ModelInfo
    format: AudioFormat
    sample_rate: int = 0  # what the client hears (0: the model's own)
    # The live stream's first sample frames, not sent: the client has them from a
    # try of the request that was cut (``generate.resume``).
    skip: int = 0
    # An encoded file's first sample frames, which its client has (it is picked
    # up, ``generate.resume_until``): sent to its encoders, which leave their
    # packets out; not their captions.
    had: int = 0
    # Send the live stream's codes with its audio (``generate.codes``): each
    # ``audio`` message the timesteps completed since the last one, from
    # ``codes_from`` on (the client has those before).
    codes: bool = False
    codes_from: int = 0
    # Say which text the audio speaks (``generate.captions``): a ``caption``
    # ahead of each text chunk's audio.
    captions: bool = False
    _codes: list[list[int]] = field(default_factory=list, repr=False)
    seq: int = 0
    # Sample frames of the live stream made: the skipped ones too, and those a
    # stream picked up from its codes did not make again (``from_sample``).
    samples: int = 0
    last_fraction: float = -1.0
    last_progress_at: float = float("-inf")
    stage: str | None = None
    first_audio_at: float | None = None
    resampler: Resampler | None = field(default=None, repr=False)
    # Frames at the model's rate of the live stream's first audio left out of
    # the resampler (``begin_at``).
    _unresampled: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        if self.sample_rate in (0, self.info.sample_rate):
            self.sample_rate = self.info.sample_rate
        else:
            self.resampler = Resampler(self.info.sample_rate, self.sample_rate, self.info.channels)

    def begin_at(self, frame: int) -> None:
        """The live stream's audio begins at ``frame`` (at the model's rate): a
        stream picked up, the audio before not made again (``Job.extra``'s
        ``from_sample``). At another rate, it is resampled from the first frame
        after where the two rates' frames meet (the frames before are left
        out), as the whole stream is there to a float's rounding when ``frame``
        is ``warm_resample_start``'s for the first frame its client lacks."""
        if self.resampler is None:
            self.samples = frame
        else:
            start, self.samples = resampled_from(self.info.sample_rate, self.sample_rate, frame)
            self._unresampled = start - frame

    def messages(self, output: StepOutput, now: float) -> list[ServerMessage]:
        """What one step's output says to the client."""
        if self.codes and output.codes:
            self._keep_codes(output.codes, output.codes_from)
        if (
            output.audio is None
            and output.stage == self.stage
            and not output.done
            and not output.waiting
            and output.caption is None
            and output.rendition is None
            and now - self.last_progress_at < PROGRESS_INTERVAL
            and output.fraction < 1.0
        ):
            return []  # (most steps: no audio, and progress went out lately)
        messages: list[ServerMessage] = []
        if self.captions and output.caption is not None:
            # (at the stream's rate; a stream picked up: those from where it was cut)
            at, text = output.caption
            offset = round(at * self.sample_rate / self.info.sample_rate)
            if offset >= max(self.skip, self.had):
                messages.append(Caption(id=self.request_id, offset=offset, text=text))
        audio = output.audio
        if self._unresampled and audio is not None and self.stage is None:
            left_out = min(self._unresampled, int(audio.shape[0]))
            self._unresampled -= left_out
            audio = audio[left_out:]
        if self.resampler is not None and self.stage is None:
            # The live stream's last chunk also brings out what soxr held back;
            # so does the last before a wait for text (the speech after it goes
            # on through a new resampler, as the codec's through a new stream).
            last = output.done or output.stage is not None or output.waiting
            if last or (audio is not None and audio.shape[0] > 0):
                empty = np.zeros((0, self.info.channels), dtype=np.float32)
                audio = self.resampler.push(empty if audio is None else audio, last=last)
            if output.waiting and not output.done:
                self.resampler = Resampler(
                    self.info.sample_rate, self.sample_rate, self.info.channels
                )
        if audio is not None and audio.shape[0] > 0:
            offset = self.samples
            self.samples += int(audio.shape[0])
            if offset < self.skip:  # (the client has these)
                audio = audio[self.skip - offset :]
                offset = self.skip
            if audio.shape[0] > 0:
                if self.first_audio_at is None:
                    self.first_audio_at = now
                codes = np.asarray(self._codes, dtype="<u2").tobytes() if self._codes else None
                self._codes = []
                messages.append(self._audio(self.seq, offset, audio, codes=codes))
                self.seq += 1
        if output.stage != self.stage:
            self.stage = output.stage
            self.last_fraction = -1.0
            self.last_progress_at = float("-inf")
        finished = output.fraction >= 1.0 > self.last_fraction  # a stage's end
        if (
            output.done
            or finished
            or progress_due(output.fraction, self.last_fraction, self.last_progress_at, now)
        ):
            self.last_fraction = output.fraction
            self.last_progress_at = now
            messages.append(
                Progress(
                    id=self.request_id,
                    fraction=output.fraction,
                    seconds=round(output.seconds, 4),
                    stage=output.stage,
                )
            )
        if output.rendition is not None:
            messages.extend(self._rendition(output.rendition, "mbd"))
        if output.waiting and not output.done:
            messages.append(
                Waiting(id=self.request_id, seconds=round(output.seconds, 4), frames=self.samples)
            )
        return messages

    def _keep_codes(self, codes: list[list[int]], first: int) -> None:
        """Keep a step's timesteps for the next ``audio`` message, from
        ``codes_from`` on (those before, the client has)."""
        if first + len(codes) <= self.codes_from:
            return
        if first < self.codes_from:
            codes = codes[self.codes_from - first :]
        self._codes.extend(codes)
        self.codes_from = max(first, self.codes_from) + len(codes)

    @property
    def skipped_seconds(self) -> float:
        """The live stream's audio made and not sent (the client had it)."""
        return min(max(self.skip, self.had), self.samples) / self.sample_rate

    @property
    def sent_seconds(self) -> float:
        """The live stream's audio sent."""
        return self.samples / self.sample_rate - self.skipped_seconds

    def stats(self, *, submitted_at: float, started_at: float, now: float) -> Stats:
        wall = now - started_at
        audio_seconds = self.samples / self.sample_rate
        return Stats(
            audio_seconds=round(audio_seconds, 6),
            wall_seconds=round(wall, 6),
            first_audio_seconds=(
                round(self.first_audio_at - started_at, 6)
                if self.first_audio_at is not None
                else None
            ),
            real_time_factor=round(audio_seconds / wall, 4) if wall > 0 else 0.0,
            samples=self.samples,
            queued_seconds=round(started_at - submitted_at, 6),
        )

    def _rendition(self, audio: FloatAudio, name: str) -> list[ServerMessage]:
        """A complete alternative version of the clip, in chunks of at most a second."""
        if self.sample_rate != self.info.sample_rate:
            audio = resample(audio, self.info.sample_rate, self.sample_rate)
        step = self.sample_rate
        return [
            self._audio(seq, start, audio[start : start + step], rendition=name)
            for seq, start in enumerate(range(0, audio.shape[0], step))
        ]

    def _audio(
        self,
        seq: int,
        offset: int,
        audio: FloatAudio,
        rendition: str | None = None,
        codes: bytes | None = None,
    ) -> Audio:
        return Audio(
            id=self.request_id,
            seq=seq,
            offset=offset,
            sample_rate=self.sample_rate,
            channels=self.info.channels,
            format=self.format,
            data=to_pcm(audio, self.format),
            rendition=rendition,
            codes=codes,
        )


def done_message(
    request_id: str,
    status: DoneStatus,
    error: WavecastError | None = None,
    stats: Stats | None = None,
) -> Done:
    """The last message of a request (§4.7): no stats when it never started."""
    info = ErrorInfo(code=error.code, message=error.message, field=error.field) if error else None
    return Done(id=request_id, status=status, stats=stats, error=info)
