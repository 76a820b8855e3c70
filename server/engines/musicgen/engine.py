"""MusicGen (audiocraft) behind the step interface.

``LMModel.generate`` returns nothing until the whole clip is done, so the LM is
stepped here by hand: the same delay pattern, streaming KV state and
classifier-free guidance as ``LMModel.generate``, one sequence step per
``step`` call. As soon as a timestep has all its codebooks it goes to the
request's stream decoder (``codec_stream.CodecStreams``: the codec's decoder run
incrementally, or windows), which emits exact audio chunks.

Every request holds a slot of ``MusicGenDecoder``'s table (two rows: the
conditional and the unconditional half of classifier-free guidance), and one
``step`` runs one batched forward for every request of the model, whatever their
positions, prompts and lengths, then samples every row at once (``sampling``:
per-row parameters, counter-based noise, so a seed gives the same codes alone or
beside others). A new request or a new long-form window is prefilled into its
slot first.

Beyond the model's window (30 s for the released checkpoints) a request goes
on in windows exactly as ``MusicGen.generate`` extends audio: each new window
is prompted with the last ``window - extend_stride`` seconds of codes, and only
its new codes join the stream, so the stream runs on across window boundaries
with no gap and no repeat. Continuation prompts an uploaded clip's codes the
same way.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable, Generator, Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from audiocraft.models.musicgen import MusicGen

from wavecast.protocol import InvalidField, ModelInfo, ParamValue, Unsupported

from ..base import (
    EngineRequest,
    FloatAudio,
    Job,
    StepOutput,
    TableSizing,
    Upload,
    attempt,
    attempt_together,
    failed_output,
    isolated,
    non_finite,
    number,
    request_seed,
    resampled_length,
    resume_timesteps,
)
from ..codec_decoders import for_serving
from ..codec_stream import (
    CodecStreams,
    Due,
    StreamDecoder,
    StreamGeometry,
    complete_due,
    frames_to_codes,
    remake,
)
from ..graphs import Key, PrefilledLogits, StepGraphs, powers_of_two, span_for
from ..kv import auto_most, room_for
from ..pieces import measured, scaled, without_grad
from ..pipelining import CodecPlace, Launched, read_back, to_device, upload
from ..precision import dtype_name
from ..prefill import PrefillBudget, choose, feed
from ..sampling import DrawPlan, RowSampling, finite_rows, sample
from ..slots import SlotTable
from .card import model_card
from .conditioning import Conditioning
from .decoder import MusicGenDecoder
from .encoding import encode_in_pieces, parts_of
from .loading import fresh_autocast
from .mbd import MBDRun
from .windows import FED_TOKEN, Codes, Window, Windows

__all__ = ["MusicGenEngine", "StreamSettings"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StreamSettings:
    """How codes become audio chunks (see ``codec_stream``: ``holdback`` is the
    windows' alone, ``left_context`` also what a prompt primes the incremental
    decoder with)."""

    left_context: int = 25
    holdback: int = 4
    first_frames: int = 1
    chunk_frames: int = 10
    max_chunk_frames: int = 50  # while the stream is well ahead of real time
    codec_batch: int = 0  # chunks per codec call at most; 0: measured at warm-up
    codec_windows: bool = False  # re-decode windows even where the codec runs incrementally


@dataclass(slots=True, weakref_slot=True)  # (tests: nothing keeps a finished one)
class _MusicGenJob:
    """The stepping state of one request (tensors live on the model's device)."""

    cfg_conditions: Any  # conditional + unconditional condition tensors (CFG)
    cfg_coef: float
    decoder: StreamDecoder
    temperature: float
    top_k: int
    top_p: float
    duration: float  # seconds, prompt included (audiocraft's meaning)
    total_len: int  # timesteps, prompt included
    first_prompt_len: int  # timesteps of the uploaded continuation prompt
    stride: int  # timesteps a window moves on by (long form)
    window: Window
    gen_offset: int = 0  # audiocraft's current_gen_offset
    produced: int = 0  # new timesteps generated so far
    # Every timestep's codes, in order: the prompt's ``[1, K, n]``, then each
    # one generated, its codes ``[K]`` as ints (``_joined_codes``).
    codes: list[Codes | list[int]] = field(default_factory=list)
    attributes: list[Any] = field(default_factory=list)  # audiocraft ConditioningAttributes
    melody: Any = None  # the reference clip's WavCondition (melody models)
    melody_length: int = 0  # its samples
    py_random: Any = None  # state of Python's `random` for this request (Demucs' shifts)
    # A long-form window's melody conditioning, being computed in pieces (the
    # window waits for it); its result replaces cfg_conditions and py_random.
    conditioning: Generator[float | None, None, tuple[Any, Any]] | None = None
    # A melody's stream picked up in a later window: the windows before it,
    # whose analyses' draws are replayed (drawn, not made) before its own.
    replayed: int = 0
    seed: int = 0
    mbd: bool = False  # render a Multi-Band Diffusion version once the codes are known
    mbd_run: MBDRun | None = None
    skip_frames: int = 0  # prompt frames not streamed (continuation without include_prompt)
    pending_audio: FloatAudio | None = None  # the prompt's audio, with include_prompt
    slot: int | None = None  # rows 2 * slot (conditional) and 2 * slot + 1 of the decoder
    first_draw: int = 0  # draws made before its first (a stream picked up from its codes)
    # A stream picked up from its codes: those known ``[1, K, n]``, their audio made
    # again in parts by ``prepare_steps`` (the outputs send what the client lacks).
    known: Codes | None = None
    kv_length: int = 0  # positions of its rows in the decoder's KV cache
    # What a step in flight brought it while the scheduler left it out of a step
    # (given at its next one).
    held: StepOutput | None = None


class MusicGenEngine(TableSizing):
    """A loaded MusicGen model served through the step interface.

    Args:
        model: The audiocraft model.
        name: The name clients use.
        test_model: Random weights (announced to clients).
        max_duration: Longest request in seconds; beyond the model's window it is
            generated in windows (long form). Default: the model's window.
        stream: Geometry of the exact incremental decoder.
        max_upload_seconds: Longest uploaded clip accepted.
        mbd: An audiocraft ``MultiBandDiffusion`` over this model's codec, to
            offer the ``mbd`` parameter.
        prefill_chunk: Prompt positions a window prefills per step at most.
        prefill_budget: Positions the decoder prefills per step at most (two
            rows a request, padding included; the oldest prompt's chunk goes
            in, cut to this if need be), so that new prompts delay the running
            streams by a bounded time per step; with a time budget, what bounds
            one step's prefill (its activations) where the time would buy more.
        prefill_budget_ms: A time budget for the same (``--prefill-budget-ms``):
            the positions per step follow the measured prefill speed (at most
            ``prefill_budget``); None: positions only.
        clock: The clock prefill calls are timed with.
        cuda_graphs: Replay the decode step as CUDA graphs, one per shape
            (``graphs``; on a CPU the same buffers, eagerly). The slot table is
            then preallocated for ``max_active`` requests and every shape is
            recorded at warm-up.
        pipelined: Launch each step before the last one's codes are read
            (``step``): on a GPU the host's part of a step (reading the codes,
            the windows' bookkeeping, the codec's calls, the scheduler's
            messages) runs while the device computes the next one, and the
            codec runs on a CUDA stream of its own (its audio read back without
            waiting for the step in flight). Each step's outputs come a step
            later; the codes are the same.
        max_prompt_tokens: Longest description, in the text encoder's tokens.
        max_active: Requests the scheduler decodes at once; 0: as many as
            the device's memory holds, found at warm-up (``kv.room_for``).
        memory_share: The part of the device's free memory (at ``size``) that
            ``max_active`` 0 sizes the table in (the server's models divide it).

    The model's codec decoder is prepared for serving in place
    (``codec_decoders.for_serving``: the same audio, without per-call waste).
    """

    ROWS_PER_STREAM = 2  # (the guidance pair)
    decoder: MusicGenDecoder

    family = "musicgen"

    def __init__(
        self,
        model: MusicGen,
        *,
        name: str,
        test_model: bool,
        max_duration: float | None = None,
        stream: StreamSettings | None = None,
        max_upload_seconds: float = 60.0,
        mbd: Any = None,
        prefill_chunk: int = 256,
        prefill_budget: int = 4096,
        prefill_budget_ms: float | None = None,
        clock: Callable[[], float] = time.perf_counter,
        cuda_graphs: bool = False,
        max_prompt_tokens: int = 512,
        max_active: int = 4,
        memory_share: float = 1.0,
        pipelined: bool = False,
    ) -> None:
        self.model = model
        self.pipelined = pipelined
        self.mbd = mbd
        self.name = name
        self.lm = model.lm
        self.test_model = test_model
        self.device = next(iter(self.lm.parameters())).device
        self.stream = stream or StreamSettings()
        self.window = float(model.max_duration)
        self.max_duration = float(max(max_duration or self.window, self.window))
        self.max_upload_seconds = max_upload_seconds
        self.prefill_chunk = max(1, prefill_chunk)
        seconds = None if prefill_budget_ms is None else prefill_budget_ms / 1000
        self.prefill = PrefillBudget(prefill_budget, seconds, self.device, clock)
        self.autocast = fresh_autocast(model)  # a new context at each use: they nest
        self.conditioning = Conditioning(model, max_prompt_tokens, self.autocast)
        self._warm = False
        self._sized: int | None = None  # (max_active as ``size`` found it)
        self.frame_rate = float(model.frame_rate)
        self.context_cost = 0.0  # seconds a step per stream-second of context (warm-up)
        self.codec_seconds = 0.0  # host seconds in the streams' codec calls, so far
        self.context_seconds: float | None = self.window  # long form slides a window
        self.windows = Windows(self.lm, self.window, self.frame_rate)
        self.hop: int = round(model.sample_rate / model.frame_rate)
        codec = getattr(model.compression_model, "model", model.compression_model)  # (stereo)
        if isinstance(getattr(codec, "decoder", None), torch.nn.Module):
            prepared = for_serving(codec.decoder)  # the same audio, sooner
            log.debug("%s: codec decoder prepared for serving: %s", name, prepared)
        geometry = StreamGeometry(
            self.stream.left_context,
            self.stream.holdback,
            self.stream.first_frames,
            self.stream.chunk_frames,
            self.stream.max_chunk_frames,
            self.frame_rate,
        )
        # Pipelined on CUDA, the codec runs on a stream of its own: reading its
        # audio back waits for its calls only, not for the decode step in flight.
        self._codec_place = CodecPlace(self.device, pipelined)
        with torch.no_grad(), self._codec_format():
            self.codec_streams = CodecStreams(
                model.compression_model,
                self._decode,
                next(iter(model.compression_model.parameters())),
                geometry,
                hop=self.hop,
                codebooks=int(self.lm.num_codebooks),
                cardinality=int(model.compression_model.cardinality),
                name=name,
                windows=self.stream.codec_windows,
            )
        autocast = getattr(model.autocast, "autocast", None)
        dtype = autocast.fast_dtype if autocast is not None else next(self.lm.parameters()).dtype
        self._asked_active = max_active  # (0: as many as fit, at warm-up)
        self.max_active = max(1, max_active)
        self.memory_share = memory_share
        self.max_prompt_tokens = max_prompt_tokens
        # Positions a window's pattern sequence takes (and a melody's chroma before it).
        self._window_steps = int(self.window * self.frame_rate) + int(self.lm.num_codebooks) + 1
        self._prepend = 0
        self.decoder = MusicGenDecoder(
            self.lm, rows=2, length=self._window_steps, cross_length=16, dtype=dtype
        )
        self._sampling = RowSampling(1, self.device)
        self._cfg = torch.zeros(1, 1, 1, device=self.device)  # [slots, 1, 1]: as guidance uses it
        # Each slot's codes of the last step that drew for it, kept on the device:
        # a pipelined step feeds them (``FED_TOKEN``) before the host has read them.
        self._fed = torch.zeros(1, self.decoder.codebooks, dtype=torch.int64, device=self.device)
        self._in_flight: Launched[_MusicGenJob] | None = None
        self._graphs = None
        self._prefilled = PrefilledLogits(2, self.decoder.codebooks, self.decoder.card, self.device)
        if cuda_graphs:
            record = self.device.type == "cuda"
            self._graphs = StepGraphs(self._graphed_step, self.decoder.storage, record=record)
            self.codec_streams.record_calls(record)
        self._slots: SlotTable[_MusicGenJob] = SlotTable(self._grow)
        self._due: Due = []
        # Streams' ends due this step: in the same calls' kind, but timed as the
        # step's, not as ``codec_seconds`` (what a running stream's chunks cost).
        self._ends: Due = []
        # Chunks per codec call (``fastest_rows``): measured at warm-up unless set.
        self.codec_batch: int | None = self.stream.codec_batch or None
        self.codec_streams.cadence.rows = self.codec_batch
        # Called with each step's guided logits by request id (tests compare rows).
        self.logits_observer: Callable[[dict[str, torch.Tensor]], None] | None = None
        self._info = model_card(
            name=name,
            test_model=test_model,
            window=self.window,
            max_duration=self.max_duration,
            frame_rate=self.frame_rate,
            card=int(self.lm.card),
            sample_rate=int(model.sample_rate),
            channels=int(model.audio_channels),
            melody=self.conditioning.melody,
            mbd=mbd is not None,
            device=str(self.device),
            dtype=dtype_name(dtype),
            codebooks=int(self.lm.num_codebooks),
        )

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def graphs(self) -> StepGraphs | None:
        return self._graphs

    # -- preparation ---------------------------------------------------------------

    def prepare(self, request: EngineRequest) -> Job:
        """Set up a request at once (``prepare_steps`` without pauses)."""
        for job in self.prepare_steps(request):
            if isinstance(job, Job):
                return job
        raise AssertionError("prepare_steps ended without a job")

    def prepare_steps(self, request: EngineRequest) -> Generator[Job | float | None, None, None]:
        """Set up a request in bounded units of work; the last item is the Job.

        Each ``None`` or float is a pause where the scheduler may run a decode
        step for the other streams: after each part of the continuation clip's
        encoding, and after each layer of a melody's Demucs separation (see
        ``melody``: a float, the part of the separation done). The text was
        bounded in tokens by ``check`` (``max_prompt_tokens``) before the request
        was queued, so its encoding is too.
        """
        params = request.params
        prompt = None
        # The progress: the clip's encoding, then a melody's separation (the
        # longer by far: the larger share), each measured in its parts.
        melody = self.conditioning.stems is not None and "melody" in request.inputs
        clip = 0.2 if melody else 1.0
        if "continuation" in request.inputs:
            prompt = yield from self._prompt_tokens(request, clip)
            # (``check`` refused a clip this long before the request was queued;
            # this stays for a request prepared without it.)
            self._check_prompt_frames(prompt.shape[-1], params)
            yield None
        with torch.no_grad():
            job = self._prepare(request, prompt)
        yield from self._remake_audio(job.state)
        if not self.conditioning.together_ok:
            st: _MusicGenJob = job.state
            yield from self._replay_analyses(st)
            conditioning = self.conditioning.in_pieces(st.attributes, st.py_random)
            start = clip if "continuation" in request.inputs else 0.0
            shared = scaled(conditioning, start, 1.0 - start)
            st.cfg_conditions, st.py_random = yield from shared
        yield job

    def most_seconds(self, request: EngineRequest) -> float | None:
        """The clip's ``duration`` (``Engine.most_seconds``); None with a
        Multi-Band Diffusion version (a post-stage) or an upload (a melody's
        analysis, a continuation's prefill)."""
        params = request.params
        if params.get("mbd") or request.inputs:
            return None
        return number(params["duration"])

    def check(self, request: EngineRequest) -> dict[str, Upload]:
        """The prompt's length in tokens, and the uploads decoded and checked,
        before the request is queued: a clip without one sample at the model's
        rate is refused, and a continuation too long for the duration, from the
        codec frames its encoding will make (``prompt_frames``)."""
        self.conditioning.check_prompt(request.prompt)
        decoded = self._decode_uploads(request.inputs)
        for role, (audio, rate) in decoded.items():
            if self._at_model_rate(len(audio), rate) == 0:
                raise _too_short(role)
        if "continuation" in decoded:
            audio, rate = decoded["continuation"]
            self._check_prompt_frames(self.prompt_frames(len(audio), rate), request.params)
        self._resume_codes(request)
        return decoded

    def _resume_codes(self, request: EngineRequest) -> Codes | None:
        """``generate.resume_codes`` as codes ``[1, K, n]``: whole timesteps of
        ``K`` codes, each below the codebooks' size, no more than the clip's
        timesteps; else ``InvalidField``."""
        data = request.resume_codes
        if not data:
            return None
        total = max(1, self.windows.frames(number(request.params["duration"])))
        k, card = int(self.lm.num_codebooks), int(self.lm.card)
        codes = resume_timesteps(data, k, card, total, "the clip has {most}")
        known: Codes = codes.T.astype(np.int64)[None]
        return known

    def prompt_frames(self, samples: int, rate: int) -> int:
        """The codec frames of a continuation clip of ``samples`` at ``rate``,
        as its encoding makes them, without encoding it: one a hop begun of
        its length at the model's rate (the SEANet encoder pads the last one;
        a test holds this to the encoding)."""
        return -(-self._at_model_rate(samples, rate) // self.hop)

    def _at_model_rate(self, samples: int, rate: int) -> int:
        """The length ``convert_audio`` resamples ``samples`` at ``rate`` to
        (``resampled_length``)."""
        return resampled_length(samples, int(rate), int(self.model.sample_rate))

    def _check_prompt_frames(self, frames: int, params: Mapping[str, ParamValue]) -> None:
        """Refuse a continuation prompt of ``frames`` codec frames that is not
        shorter than the request's duration and the model's window."""
        duration = number(params["duration"])
        total_len = max(1, self.windows.frames(duration))
        max_prompt = self.windows.frames(min(duration, self.window))
        if frames >= min(total_len, max_prompt):
            raise InvalidField(
                f"the continuation prompt ({frames / self.frame_rate:.2f} s) must be shorter "
                f"than duration and than the model's {self.window:g} s window",
                field="inputs.continuation",
            )

    def _decode_uploads(self, inputs: Mapping[str, bytes]) -> dict[str, Upload]:
        from ...audio import decode_upload

        return {
            role: decode_upload(data, field=f"inputs.{role}", max_seconds=self.max_upload_seconds)
            for role, data in inputs.items()
        }

    def _upload_wav(self, request: EngineRequest, role: str) -> torch.Tensor:
        """An uploaded clip as ``[C, T]`` at the model's rate and channel count."""
        from audiocraft.data.audio_utils import convert_audio

        decoded = request.decoded.get(role)
        audio, rate = decoded or self._decode_uploads({role: request.inputs[role]})[role]
        wav = torch.from_numpy(audio.T.copy()).to(self.device)
        converted: torch.Tensor = convert_audio(
            wav, rate, self.model.sample_rate, self.model.audio_channels
        )
        if converted.shape[-1] == 0:  # (``check`` refuses it before the request is queued)
            raise _too_short(role)
        return converted

    def _prompt_tokens(
        self, request: EngineRequest, share: float = 1.0
    ) -> Generator[float, None, Codes]:
        """Encode an uploaded clip into codes ``[1, K, T]`` (audiocraft's
        continuation), a part at a time (``encode_in_pieces``), in float32 as
        audiocraft does; each pause with the part done, within ``share`` of
        the preparation."""
        with torch.no_grad():
            wav = self._upload_wav(request, "continuation").unsqueeze(0)
        codec = self.model.compression_model
        pieces = measured(encode_in_pieces(codec, wav), parts_of(codec), 0.0, share)
        tokens, scale = yield from without_grad(pieces)
        assert scale is None
        codes: Codes = tokens.cpu().numpy().astype(np.int64)
        return codes

    def _prepare(self, request: EngineRequest, prompt: Codes | None) -> Job:
        params = request.params
        duration = number(params["duration"])
        seed = request_seed(params)
        total_len = max(1, self.windows.frames(duration))

        reference = None
        if "melody" in request.inputs:
            reference = self._upload_wav(request, "melody")
        attributes = self.conditioning.attributes(request.prompt, reference)
        melody = attributes[0].wav.get("self_wav")
        # Its length in samples, read here once (long form wraps it at each window).
        melody_length = 0 if melody is None else int(melody.length.item())
        if duration > self.window and melody is not None:
            self.conditioning.wrap_melody(attributes, melody, melody_length, 0.0, self.window)
        py_random = _seeded_state(seed)

        stride_seconds = number(params.get("extend_stride") or 18.0)
        decoder = self.codec_streams.stream()
        first_prompt_len = 0 if prompt is None else int(prompt.shape[-1])
        job = _MusicGenJob(
            # Text alone: encoded at the first prefill, with its peers'; otherwise
            # by prepare_steps (a melody in pieces).
            cfg_conditions=None,
            cfg_coef=number(params["cfg_coef"]),
            decoder=decoder,
            temperature=number(params["temperature"]),
            top_k=int(number(params["top_k"])),
            top_p=number(params["top_p"]),
            duration=duration,
            total_len=total_len,
            first_prompt_len=first_prompt_len,
            stride=int(self.frame_rate * stride_seconds),
            window=self.windows.start(duration, 0, prompt),
            attributes=attributes,
            melody=melody,
            melody_length=melody_length,
            py_random=py_random,
            seed=seed,
            mbd=bool(params.get("mbd")) and self.mbd is not None,
        )
        known = self._resume_codes(request)
        if known is not None:
            self._pick_up(job, known, prompt)
        include = bool(params.get("include_prompt"))
        heard = 0
        if prompt is not None:
            job.codes.append(prompt)
            if not include:
                job.skip_frames = first_prompt_len
        if job.known is not None:
            heard = self._heard(job, prompt, include, request.resume)
        elif prompt is not None and include:
            with self._codec_format():
                job.pending_audio = decoder.push(prompt)
        elif prompt is not None:
            decoder.prime(prompt)
        # The live stream's length: the new part, or the clip with its prompt.
        streamed = total_len if include else total_len - first_prompt_len
        extra: dict[str, ParamValue] = {
            "seed": seed,
            "seconds": round(streamed / self.frame_rate, 6),
        }
        if job.known is not None:  # (taken from them, not generated)
            extra["from_codes"] = round(job.produced / self.frame_rate, 6)
            extra["from_sample"] = heard * self.hop
        return Job(request=request, state=job, extra=extra)

    def _heard(self, job: _MusicGenJob, prompt: Codes | None, include: bool, resume: int) -> int:
        """A picked-up stream's decoder set up: the live stream's frames (the
        continuation ``prompt`` where it is streamed, ``include``, then the
        known codes) whose audio its client has (``resume`` sample frames) are
        context only, after a prompt not streamed; the rest is made again
        (``_remake_audio``). The frames heard."""
        assert job.known is not None
        job.codes.append(job.known)
        streamed = prompt is not None and include
        live = np.concatenate([prompt, job.known], axis=-1) if streamed else job.known
        heard = min(resume // self.hop, int(live.shape[-1]))
        context = live[..., :heard]
        if prompt is not None and not include:
            context = np.concatenate([prompt, context], axis=-1)
        if context.shape[-1]:
            job.decoder.prime(context)
        job.known = live[..., heard:]
        return heard

    def _pick_up(self, job: _MusicGenJob, known: Codes, prompt: Codes | None) -> None:
        """Pick a stream up from the codes of its first timesteps (``known``
        ``[1, K, n]``, after the continuation ``prompt``): the window that
        generates the next timestep starts prompted with what it holds of them
        (its prefill, in a step or a few, instead of a step a timestep), and the
        request's draws count on from the same number, so that its codes are
        those of the try that was cut (the same seed). The codes' audio is made
        again (``_remake_audio``). The last timestep is always generated. A
        melody's window after the first is conditioned on its analysis, which
        draws on the windows' before it: theirs are replayed, their draws
        drawn, not made (``_replay_analyses``); where the melody's Demucs
        draws otherwise than is known, the stream is made from its start."""
        first = 0 if prompt is None else int(prompt.shape[-1])
        known = known[..., : max(0, job.total_len - first - 1)]
        point = self.windows.resume_point(
            job.duration, job.stride, first, first + int(known.shape[-1])
        )
        if point is None or known.shape[-1] == 0:
            return
        gen_offset, draws = point
        melody = job.melody is not None and job.melody_length > 0
        if gen_offset > 0 and melody and not self.conditioning.draws_known:
            return
        if gen_offset > 0 and melody:
            job.replayed = gen_offset // job.stride
        codes = known if prompt is None else np.concatenate([prompt, known], axis=-1)
        job.gen_offset = gen_offset
        job.window = self.windows.start(job.duration, gen_offset, codes[..., gen_offset:])
        job.first_draw = draws
        job.produced = int(known.shape[-1])
        job.known = known

    def _replay_analyses(self, st: _MusicGenJob) -> Generator[None, None, None]:
        """A melody's stream picked up in a later window: the draws of the
        analyses of the windows before it, replayed (``draws_after``: none is
        made, a pause after each), then its melody wrapped for its window,
        which the preparation then analyses from there."""
        if not st.replayed:
            return
        for index in range(st.replayed):
            self._wrap_melody(st, index * st.stride)
            state = self.conditioning.draws_after(st.attributes, st.py_random)
            assert state is not None  # (``_pick_up`` checked ``draws_known``)
            st.py_random = state
            yield None
        self._wrap_melody(st, st.gen_offset)

    def _wrap_melody(self, st: _MusicGenJob, offset: int) -> None:
        """The melody for the window that starts ``offset`` timesteps in."""
        self.conditioning.wrap_melody(
            st.attributes, st.melody, st.melody_length, offset / self.frame_rate, self.window
        )

    def _remake_audio(self, st: _MusicGenJob) -> Generator[None, None, None]:
        """The audio of a picked-up stream's known codes, made again
        (``remake``: in parts of about the prefill's time budget, a pause
        after each), after the prompt's."""
        known, st.known = st.known, None
        if known is None:
            return
        parts = [] if st.pending_audio is None else [st.pending_audio]
        parts += yield from remake(st.decoder, known, self._codec_format, self.prefill.seconds)
        if parts:
            st.pending_audio = np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _condition_piece(self, st: _MusicGenJob) -> None:
        """One piece of a window's conditioning; its result once complete."""
        assert st.conditioning is not None
        try:
            next(st.conditioning)
        except StopIteration as complete:
            st.cfg_conditions, st.py_random = complete.value
            st.conditioning = None

    def begin(self, jobs: Sequence[Job]) -> None:
        """The descriptions of requests about to start encoded in one call now,
        not in their first step (see ``Engine.begin``). (A melody model's
        conditioning is done in ``prepare_steps``, in pieces.)"""
        states = [job.state for job in jobs]
        starting = [st for st in states if st.cfg_conditions is None and st.conditioning is None]
        if not starting:
            return
        try:
            with torch.no_grad(), self.autocast():
                self._condition_together(starting)
        except Exception:  # (left to the first step, where each fails on its own)
            log.debug("%s: encoding %d descriptions failed", self.name, len(starting))
            for st in starting:
                st.cfg_conditions = None

    def _condition_together(self, states: list[_MusicGenJob]) -> None:
        """The descriptions of requests starting now, encoded in one call."""
        conditions = self.conditioning.together([st.attributes[0] for st in states])
        for st, each in zip(states, conditions, strict=True):
            st.cfg_conditions = each

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        with self._codec_format():
            out: torch.Tensor = self.model.compression_model.decode(codes.to(self.device), None)
        return out

    def _codec_format(self) -> contextlib.ExitStack:
        """The codec decodes in float32 (as audiocraft's ``generate`` does, after
        its language model's autocast), whatever format the steps run in; with
        pipelined steps on CUDA, on its own stream (``CodecPlace``)."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(self.device.type, enabled=False))
        stack.enter_context(self._codec_place())
        return stack

    # -- stepping ------------------------------------------------------------------

    def step(self, jobs: Sequence[Job]) -> list[StepOutput]:
        """One step of every job: one forward for all that generate.

        A request that fails on its own (its conditioning, its prompt, its
        bookkeeping, its codec window, non-finite logits in its rows) ends alone
        with an error output; only a failure of the shared forward fails them all.
        """
        with torch.no_grad(), self.autocast():
            outputs: list[StepOutput | None] = [None] * len(jobs)
            generating: list[tuple[int, Job]] = []
            for i, job in enumerate(jobs):
                run = job.state.mbd_run
                if run is not None:
                    outputs[i] = isolated(job, self._step_mbd, job, run)
                else:
                    generating.append((i, job))
            if generating and self.pipelined:
                self._step_pipelined(generating, outputs)
            elif generating:
                states = [job.state for _, job in generating]
                failures: dict[int, BaseException] = {}
                launched = self._launch(states, failures)
                if launched is not None:
                    self._collect(launched, failures)
                self._advance_all(generating, launched, failures, outputs)
        return [out for out in outputs if out is not None]

    def _step_pipelined(
        self, generating: list[tuple[int, Job]], outputs: list[StepOutput | None]
    ) -> None:
        """``step`` with the device a step ahead of the host: this step is
        launched first (a request whose last codes are still in flight feeds
        them on the device), then the last step's codes are read and streamed
        while the device computes it. A request waits a step where the codes in
        flight end its window (the next window's prompt is made of them), so a
        request's codes, and its audio, are those of the plain step; each step's
        outputs come a step later."""
        before, self._in_flight = self._in_flight, None
        # The requests whose last codes are in flight (read below, after the launch).
        pending = set() if before is None else {id(st) for st, _ in before.drew}
        launching = [
            job.state
            for _, job in generating
            if not (id(job.state) in pending and job.state.window.ends_next)
        ]
        failures: dict[int, BaseException] = {}
        jobs = {id(job.state): job for _, job in generating}
        self._in_flight = self._launch(launching, failures, jobs, pending)
        if before is not None:
            self._collect(before, failures)
            # (The scheduler leaves no decoding request out of a step; should one
            # be, its codes still go into its window, and its output waits.)
            present = {id(job.state) for _, job in generating}
            absent = [
                (-1, job)
                for st, job in before.current(self._slots)
                if job is not None and id(st) not in present
            ]
            if absent:
                held: list[StepOutput | None] = [None] * len(absent)
                self._advance_all(absent, before, failures, held)
                for (_, job), output in zip(absent, held, strict=True):
                    job.state.held = output
        self._advance_all(generating, before, failures, outputs)

    def _advance_all(
        self,
        generating: list[tuple[int, Job]],
        launched: Launched[_MusicGenJob] | None,
        failures: dict[int, BaseException],
        outputs: list[StepOutput | None],
    ) -> None:
        """Each request's output of a step: its failure, or its codes of
        ``launched`` (None: none drew) written into its window and what of them
        is ready streamed (the step's codec calls together), or nothing new (a
        prompt, or its window's conditioning, still going in; or, pipelined, it
        did not draw in the step read)."""
        drawn: list[list[int]] = []
        stepped = np.zeros(0, dtype=bool)
        guided = torch.zeros(0)
        if launched is not None:
            stepped, guided = launched.stepped, launched.logits
            drawn = launched.rows()  # (each slot's codes as ints, then its finiteness)
        drew_ids = {id(st) for st, _ in launched.drew} if launched is not None else set()

        def drew(st: _MusicGenJob) -> bool:
            # (Rows that sat the step out may lie beyond the step's span.)
            return (
                id(st) in drew_ids
                and st.slot is not None
                and st.slot < len(stepped)
                and bool(stepped[st.slot])
            )

        if self.logits_observer is not None and launched is not None:
            self.logits_observer(
                {
                    job.request.request_id: guided[job.state.slot]
                    for _, job in generating
                    if id(job.state) not in failures and drew(job.state)
                }
            )
        self._due.clear()
        self._ends.clear()
        self.codec_streams.tick()
        for i, job in generating:
            st = job.state
            if id(st) in failures:
                self._clear_rows(st)
                outputs[i] = failed_output(job, failures[id(st)])
            elif drew(st):
                outputs[i] = isolated(job, self._advance, job, drawn[st.slot][:-1])
            elif st.held is not None:
                outputs[i], st.held = st.held, None
            else:  # its prompt (or its window's conditioning) is still going in
                outputs[i] = StepOutput(
                    audio=None, fraction=self._fraction(st), seconds=self._seconds(st)
                )
        self._decode_due()

    def _decode_due(self) -> None:
        """Decode every stream's due codec window, batched (calls of at most
        ``codec_batch``), then the ends of the streams that ended. (First chunks
        due a step before others' wait for them: ``wait_for_firsts``.)"""
        if self._due:
            due, self._due = self.codec_streams.due_now(self._due), []
            began = time.perf_counter()
            with self._codec_format():
                complete_due(self._decode, due, self.codec_batch)
            self.codec_seconds += time.perf_counter() - began
        if self._ends:
            ends, self._ends = self._ends, []
            with self._codec_format():
                complete_due(self._decode, ends, self.codec_batch)

    # -- the slot table --------------------------------------------------------------

    def _take_slot(self, st: _MusicGenJob) -> None:
        st.slot = self._slots.take(st)

    def _write_sampling(self, states: list[_MusicGenJob]) -> None:
        """The sampling parameters and guidance scales of requests taking their
        rows this step, in one write."""
        slots = [st.slot for st in states if st.slot is not None]
        self._sampling.set_requests(slots, states, [st.first_draw for st in states])
        cfg = torch.tensor([st.cfg_coef for st in states], dtype=self._cfg.dtype)
        index = upload({"slots": slots}, self.device)["slots"]
        self._cfg[index] = to_device(cfg, self.device, later=True).view(-1, 1, 1)

    def _grow(self, slots: int) -> int:
        """Room for ``slots`` requests (two rows each); how many there is now."""
        self.decoder.ensure(rows=2 * slots)
        count = self.decoder.rows // 2
        old = int(self._cfg.shape[0])
        if count > old:
            self._sampling = self._sampling.grown(count)
            self._cfg = torch.cat([self._cfg, self._cfg.new_zeros(count - old, 1, 1)])
            self._fed = torch.cat([self._fed, self._fed.new_zeros(count - old, self._fed.shape[1])])
            self._prefilled.grow(2 * count)
        return count

    def _clear_rows(self, st: _MusicGenJob) -> None:
        """Zero a failed request's rows (its cache and its conditions' keys and
        values): what it left there (NaN, say) must not reach the slot's next
        request through a masked position."""
        if st.slot is not None and self._slots.holds(st, st.slot):
            self.decoder.clear([2 * st.slot, 2 * st.slot + 1])

    def _release_slot(self, st: _MusicGenJob) -> None:
        self._slots.release(st, st.slot)
        st.slot = None

    def _load_windows(self, states: list[_MusicGenJob], failures: dict[int, BaseException]) -> None:
        """Load the windows' conditioning of ``states`` into their rows and make
        their prompts' embeddings (``window.prompt_inputs``, fed in chunks by
        ``_prefill``): the cross-attention keys and values of all of them in one
        call (a crowd's first step: one projection a layer, not one a request). If
        that call fails, each is loaded alone, so that only the one at fault fails."""
        fused: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}
        for st in states:
            out = attempt(failures, [st], self._fuse, st)
            if out is not None:
                fused[id(st)] = out
        loading = [st for st in states if id(st) in fused]

        def load(group: list[_MusicGenJob]) -> None:
            self._set_conditions([(st, fused[id(st)][0]) for st in group])

        attempt_together(failures, loading, load)
        for st in loading:
            if id(st) not in failures:
                st.window.prompt_inputs = fused[id(st)][1]

    def _fuse(self, st: _MusicGenJob) -> tuple[torch.Tensor | None, torch.Tensor]:
        """A window's cross-attention source ``[2, C, D]`` (the conditional and the
        unconditional row's; None where the model has none) and the positions to
        prefill, ``[2, P, D]``: what the fuser prepends (a melody's chroma) and
        the prompt's codes, as at the first step of ``LMModel.generate``."""
        win = st.window
        empty = torch.zeros(2, 0, self.decoder.dim, device=self.device)
        prepend, cross = self.lm.fuser(empty, st.cfg_conditions)
        self._prepend = max(self._prepend, int(prepend.shape[1]))
        prompt = upload({"prompt": win.prompt()}, self.device)["prompt"]
        codes = prompt[None].expand(2, -1, -1)
        inputs = torch.cat([prepend.to(empty.dtype), self.decoder.embed(codes)], dim=1)
        self.decoder.ensure(length=int(prepend.shape[1]) + win.end_offset)
        return cross, inputs

    def _set_conditions(self, fused: list[tuple[_MusicGenJob, torch.Tensor | None]]) -> None:
        """The windows' cross-attention sources into their rows, in one call
        (padded to the longest; each row attends to its own length)."""
        rows: list[int] = []
        sources: list[torch.Tensor] = []
        for st, cross in fused:
            assert st.slot is not None
            rows += [2 * st.slot, 2 * st.slot + 1]
            if cross is not None:
                sources.append(cross)
        if len(sources) < len(fused):  # (a model without conditions to attend to)
            self.decoder.set_conditions(rows, None)
        elif len(sources) == 1:
            self.decoder.set_conditions(rows, sources[0])
        else:
            width = max(int(source.shape[1]) for source in sources)
            pad = torch.nn.functional.pad
            padded = [pad(source, (0, 0, 0, width - int(source.shape[1]))) for source in sources]
            lengths = [int(source.shape[1]) for source in sources for _ in range(2)]
            self.decoder.set_conditions(rows, torch.cat(padded), lengths)

    def _prefill(
        self, states: list[_MusicGenJob], failures: dict[int, BaseException]
    ) -> dict[int, torch.Tensor]:
        """Feed the next chunk of the windows' prompts not in the cache yet, oldest
        first, in one call (chunks of different lengths and places padded to the
        longest). A window whose whole prompt is one position (no prompt codes,
        nothing prepended: the pattern's first column) is not fed here: its rows
        are emptied and the step's forward takes that column, with the running
        rows'.

        At most ``prefill_chunk`` positions per window, and the step's budget in
        all (``prefill``, counted in the decoder's rows: two a request; ``choose``
        says which chunks fit it), so that long prompts (continuations, long-form
        windows' re-prefills, melodies' chroma) delay the other streams by about
        the budget per step, however many come at once. Returns the logits
        ``[2, K, card]`` of each slot whose prompt is now complete: it samples in
        this step. A request whose chunk fails alone goes into ``failures``
        (``feed``).
        """
        self._load_windows([st for st in states if st.window.prompt_inputs is None], failures)
        waiting = []
        for st in states:
            win = st.window
            if win.prompt_inputs is None:  # (its conditioning failed)
                continue
            if win.prompt_fed == 0 and int(win.prompt_inputs.shape[1]) == 1:
                # A prompt of one position (the pattern's first column, nothing
                # prepended): it goes in as the step's, with the decoding rows'
                # (one forward for a crowd's first step, not a prefill and a step).
                assert st.slot is not None
                self.decoder.empty([2 * st.slot, 2 * st.slot + 1])
                st.kv_length = 0
                win.prefilled = True
                win.prompt_inputs = None
                continue
            size = min(int(win.prompt_inputs.shape[1]) - win.prompt_fed, self.prefill_chunk)
            waiting.append((st, size))
        complete: dict[int, torch.Tensor] = {}
        if not waiting:
            return complete
        chosen, width = choose(waiting, self.prefill.now(), rows=2)
        logits = feed(chosen, width, self._prefill_call, failures, self.prefill, rows=2)
        for (st, size), pair in zip(chosen, logits, strict=True):
            if pair is None:
                continue
            win = st.window
            win.prompt_fed += size
            assert win.prompt_inputs is not None
            if win.prompt_fed == int(win.prompt_inputs.shape[1]):
                assert st.slot is not None
                complete[st.slot] = pair
                st.kv_length = win.prompt_fed
                win.prefilled = True
                win.prompt_inputs = None
        return complete

    def _prefill_call(
        self, chosen: list[tuple[_MusicGenJob, int]], width: int
    ) -> list[torch.Tensor]:
        """One prefill call: each window's next ``size`` positions (both of its
        rows), padded to ``width``; each one's logits ``[2, K, card]``."""
        rows, starts, sizes, parts = [], [], [], []
        for st, size in chosen:
            win = st.window
            assert st.slot is not None and win.prompt_inputs is not None
            chunk = win.prompt_inputs[:, win.prompt_fed : win.prompt_fed + size]
            parts.append(torch.nn.functional.pad(chunk, (0, 0, 0, width - size)))
            rows += [2 * st.slot, 2 * st.slot + 1]
            starts += [win.prompt_fed] * 2
            sizes += [size] * 2
        logits = self.decoder.prefill(rows, torch.cat(parts), starts, sizes)
        return list(logits.split(2))

    def _launch(
        self,
        states: list[_MusicGenJob],
        failures: dict[int, BaseException],
        jobs: Mapping[int, Job] | None = None,
        pending: Set[int] = frozenset(),
    ) -> Launched[_MusicGenJob] | None:
        """One forward for every request (prefilling new windows), one draw per
        row, launched (None: no request drew).

        The step's inputs (every row's codes, which rows advance, every slot's
        sampling key) cross to the device as one array, and the sampled codes come
        back as one (``_collect``): ``[slots, K]``, a request's at its slot; with
        them the guided logits ``[slots, K, card]`` (on the device; tests compare
        rows) and which slots sampled (not those whose prompt is still being
        prefilled). A request whose last codes are in flight (``pending``, by
        ``id`` of its state: pipelined) feeds them on the device. Requests that
        fail on their own go into ``failures`` (by ``id`` of their state) and
        out of the step. ``jobs``: the requests' jobs by ``id`` of their state
        (pipelined steps keep them with the step).
        """
        joining = [st for st in states if st.slot is None]
        for st in joining:
            attempt(failures, [st], self._take_slot, st)
        taken = [st for st in joining if id(st) not in failures]
        attempt_together(failures, taken, self._write_sampling)
        for st in states:
            if st.conditioning is not None and id(st) not in failures:
                attempt(failures, [st], self._condition_piece, st)
        # (A window whose conditioning is still being computed sits this step out.)
        states = [st for st in states if id(st) not in failures and st.conditioning is None]
        starting = [st for st in states if st.cfg_conditions is None]
        if starting:
            attempt_together(failures, starting, self._condition_together)
        states = [st for st in states if id(st) not in failures]
        prefilled = self._prefill([st for st in states if not st.window.prefilled], failures)
        states = [st for st in states if id(st) not in failures]
        decoder = self.decoder
        if not states:
            return None
        k = decoder.codebooks
        slots = self._slots.span(st.slot for st in states if st.slot is not None)
        rows = 2 * slots
        sampling = self._sampling
        stepped = np.zeros(slots, dtype=bool)
        host = np.zeros(_inputs_size(rows, k), dtype=np.int64)
        codes_in, active, keys_in, overrides = _split_inputs(host, rows, k)
        decoding = [st for st in states if st.window.prefilled and st.slot not in prefilled]
        if decoding:
            # Each decoding slot's pair of rows feeds its window's last column (one
            # write for all: numpy's cost is the call's, not the codes').
            fed: list[int] = []
            for st in decoding:
                assert st.slot is not None
                fed.append(st.slot)
            codes_in.reshape(slots, 2, k)[fed] = [
                [st.window.pending_column() if id(st) in pending else st.window.last_column()]
                for st in decoding
            ]
            active.reshape(slots, 2)[fed] = 1
            stepped[fed] = True
        stepped[list(prefilled)] = True
        for slot in prefilled:
            overrides[2 * slot : 2 * slot + 2] = 1
        keys_in[:] = sampling.draw_keys(slots, k)
        # Attend over the longest row's positions, rounded up to a power of two (a
        # handful of shapes per window length).
        span = span_for(max((st.kv_length for st in decoding), default=0) + 1)
        inputs = to_device(torch.from_numpy(host), self.device, self.pipelined)
        if self._graphs is not None and decoding:
            for slot, pair in prefilled.items():
                self._prefilled.logits[2 * slot : 2 * slot + 2] = pair.float()
            back_device, guided = self._graphs((rows, span), inputs)
        else:
            codes, advance, keys, took = _split_inputs(inputs, rows, k)
            if self.pipelined:
                codes = self._feed(codes)
            if decoding:
                logits = decoder.decode(codes, advance.bool(), span).float()
            else:
                logits = torch.zeros(rows, k, decoder.card, device=self.device)
            for slot, pair in prefilled.items():
                logits[2 * slot : 2 * slot + 2] = pair.float()
            plan = sampling.plan(stepped, decoder.card)
            guided, back_device = self._draw(logits, keys, slots, plan)
            if self.pipelined:
                self._keep_fed(back_device, advance, took)
        for st in decoding:
            st.kv_length += 1
        sampling.step[:slots] += stepped
        # One copy back: the codes, and whether each slot's logits were finite.
        back, ready = read_back(back_device, self.pipelined)
        if self.pipelined and self.logits_observer is not None:
            guided = guided.clone()
        jobs = jobs or {}
        drew = [
            (st, jobs.get(id(st)))
            for st in states
            if st.slot is not None and st.slot < slots and stepped[st.slot]
        ]
        return Launched(back, ready, guided, stepped, drew)

    def _collect(
        self, launched: Launched[_MusicGenJob], failures: dict[int, BaseException]
    ) -> None:
        """Wait for a launched step's codes on the host; the requests whose rows'
        logits were not finite go into ``failures``."""
        rows = launched.rows()
        # (Pipelined: a request finished since its launch is no one's concern.)
        for st, _ in launched.current(self._slots):
            assert st.slot is not None
            if not rows[st.slot][-1]:
                failures[id(st)] = non_finite()

    def _feed(self, codes: torch.Tensor) -> torch.Tensor:
        """A step's input codes ``[rows, K]`` with each ``FED_TOKEN`` the code its
        slot drew in the last step that drew for it (``_fed``)."""
        rows, k = codes.shape
        fed = self._fed[: rows // 2, None].expand(rows // 2, 2, k).reshape(rows, k)
        return torch.where(codes == FED_TOKEN, fed, codes)

    def _keep_fed(self, back: torch.Tensor, active: torch.Tensor, took: torch.Tensor) -> None:
        """Keep the codes of the slots that drew (``back`` ``[slots, K + 1]``; the
        slots whose rows advanced, ``active``, or took their prefill's logits,
        ``took``) for the steps that feed them (``_feed``)."""
        slots = int(back.shape[0])
        drew = (active.view(slots, 2)[:, 0] + took.view(slots, 2)[:, 0]) > 0
        fed = self._fed[:slots]
        fed.copy_(torch.where(drew[:, None], back[:, :-1], fed))

    def _draw(
        self,
        logits: torch.Tensor,
        keys: torch.Tensor,
        slots: int,
        plan: DrawPlan | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Classifier-free guidance and every slot's draw from its pair of rows'
        logits: the guided logits ``[slots, K, card]``, and ``[slots, K + 1]``: the
        codes and whether the slot's logits were finite. (``plan``: what the
        stepped rows need, ``RowSampling.plan``; None: anything, over the whole
        vocabulary, as a graph recorded once for every step does.)"""
        sampling = self._sampling
        cond, uncond = logits[0::2], logits[1::2]
        guided = uncond + (cond - uncond) * self._cfg[:slots]
        tokens = sample(
            guided,
            sampling.temperature[:slots],
            sampling.top_k[:slots],
            sampling.top_p[:slots],
            keys,
            scale=sampling.scale[:slots],
            **({} if plan is None else plan.arguments()),
        )
        finite = finite_rows(guided)
        return guided, torch.cat([tokens, finite[:, None].to(tokens.dtype)], 1)

    def _graphed_step(
        self, inputs: Sequence[torch.Tensor], key: Key
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The device side of a step, as one graph: the forward of every row, the
        prefilled rows' logits in place of theirs, guidance and the draw (over
        the whole vocabulary: a token's noise depends on its id, so the codes are
        those of the eager step's candidates). ``[slots, K + 1]`` and the guided
        logits."""
        rows, span = key
        codes, active, keys, overrides = _split_inputs(inputs[0], rows, self.decoder.codebooks)
        if self.pipelined:
            codes = self._feed(codes)
        logits = self.decoder.decode(codes, active.bool(), span).float()
        logits = self._prefilled.merge(logits, overrides)
        guided, back = self._draw(logits, keys, rows // 2, None)
        if self.pipelined:
            self._keep_fed(back, active, overrides)
        return back, guided

    def _step_mbd(self, job: Job, run: MBDRun) -> StepOutput:
        st: _MusicGenJob = job.state
        job.steps += 1
        wav = run.step()
        rendition = None
        if wav is not None:
            # [channels (batch), 1, T] for stereo; [1, 1, T] for mono -> [T, channels]
            audio = wav[:, 0].transpose(0, 1)[st.skip_frames * self.hop :]
            rendition = np.ascontiguousarray(audio.float().cpu().numpy(), dtype=np.float32)
        return StepOutput(
            audio=None,
            fraction=run.fraction,
            seconds=st.produced / self.frame_rate,
            done=wav is not None,
            stage="mbd",
            rendition=rendition,
        )

    def _advance(self, job: Job, sampled: list[int]) -> StepOutput:
        """Write a request's sampled codes ``[K]`` into its window and stream what is ready."""
        st: _MusicGenJob = job.state
        win = st.window
        ready = win.write(sampled)
        job.steps += 1

        audio, st.pending_audio = st.pending_audio, None
        plan = None
        codes_from = st.produced
        if ready is not None:
            st.produced += len(ready)
            st.codes += ready
            if len(ready) == 1:  # (a step's usual timestep: one)
                plan = st.decoder.plan_push_frame(ready[0])
            else:
                plan = st.decoder.plan_push(frames_to_codes(ready))
        done = False
        if win.done:
            done = self._next_window(st)
        if done:
            # The rest of the stream, in the step's codec calls (streams that end
            # together, with the same frames left, in one).
            plan = st.decoder.plan_flush()
        if done and st.mbd:
            # The live stream is complete; the diffusion version follows, step by step.
            self._release_slot(st)
            generator = torch.Generator(device=self.device)
            generator.manual_seed(st.seed)
            all_codes = torch.from_numpy(_joined_codes(st.codes)).to(self.device)
            if int(self.model.audio_channels) == 2:
                # As audiocraft's MusicGen demo: each channel's codes through the
                # mono MBD, as a batch of two.
                left, right = self.model.compression_model.get_left_right_codes(all_codes)
                all_codes = torch.cat([left, right])
            st.mbd_run = MBDRun(self.mbd, all_codes, generator)
            output = StepOutput(
                audio=audio, fraction=1.0, seconds=st.produced / self.frame_rate, done=False
            )
        else:
            fraction = 1.0 if done else self._fraction(st)
            output = StepOutput(
                audio=audio, fraction=fraction, seconds=self._seconds(st), done=done
            )
        output.codes, output.codes_from = ready, codes_from
        if plan is not None:
            (self._ends if done else self._due).append((output, st.decoder, plan))
        return output

    def _fraction(self, st: _MusicGenJob) -> float:
        target = st.total_len - st.first_prompt_len
        return min(0.999, st.produced / target) if target > 0 else 0.0

    def _seconds(self, st: _MusicGenJob) -> float:
        return st.produced / self.frame_rate

    def _next_window(self, st: _MusicGenJob) -> bool:
        """The current window is complete: start the next one, or report the end.

        Mirrors the loop of ``MusicGen._generate_tokens``: move on by ``stride``
        timesteps and prompt the next window with what follows in this one.
        """
        window_codes = st.window.codes()
        st.gen_offset += st.stride
        prompt = window_codes[..., st.stride :]
        if st.gen_offset + prompt.shape[-1] >= st.total_len or st.duration <= self.window:
            return True
        st.window = self.windows.start(st.duration, st.gen_offset, prompt)
        if st.melody is not None and st.melody_length > 0:
            # The next window's melody: its chroma in pieces, a layer per step
            # (``_launch``); the window waits for it.
            self._wrap_melody(st, st.gen_offset)
            st.conditioning = self.conditioning.in_pieces(st.attributes, st.py_random)
        return False

    # Seconds of music the warm-up's first request makes: its first chunk and a
    # chunk after it (a second took 3 s more of MusicGen-small's warm-up on two CPU
    # cores, and the requests after it started no sooner: bench/RESULTS.md).
    WARM_UP_SECONDS = 0.3

    def _warm_up_request(self) -> tuple[str, dict[str, ParamValue]]:
        return ("warm up", {"duration": min(self.WARM_UP_SECONDS, self.window), "seed": 0})

    def _codec_context(self) -> contextlib.ExitStack:
        return self._codec_format()

    def _step_context(self) -> contextlib.AbstractContextManager[Any]:
        return self.autocast()

    def _table_length(self) -> int:
        return self._table_size()[0]

    def _table_size(self) -> tuple[int, int]:
        """A request's positions (a window, a melody's chroma included) and
        conditions (descriptions up to 128 tokens) as the table is reserved for."""
        return self._prepend + self._window_steps, min(self.max_prompt_tokens, 128)

    def _measured(self) -> list[torch.nn.Module]:
        return [self.lm, self.model.compression_model]

    def _check_room(self, step: float) -> None:
        """Refuse to serve ``max_active`` requests whose table the memory cannot hold
        (reserved now with graphs, grown on demand without: refused either way);
        where none were asked for, as many as fit (``room_for``), up to what one
        stream's ``step`` (its time at warm-up) leaves (``auto_most``)."""
        length, cross = self._table_size()
        decoder = self.decoder
        self.max_active = room_for(
            self.name,
            lambda n: decoder.bytes_for(rows=2 * n, length=length, cross_length=cross),
            self._asked_active,
            self.device,
            self.memory_share,
            auto_most(self.device, step, self.frame_rate),
        )

    def _prepare_graphs(self) -> None:
        """Every shape of the decode step that ``max_active`` requests can take,
        ready now (on CUDA, recorded before the server reports ready, so that no
        stream waits on a recording later): the table's rows for them, a window's
        positions (a melody's chroma included, as the warm-up found it) and
        descriptions up to 128 tokens preallocated (a longer one grows the cache:
        the graphs are recorded again as their shapes come back)."""
        assert self._graphs is not None
        self._slots.reserve(self.max_active)
        length, cross = self._table_size()
        self.decoder.ensure(length=length, cross_length=cross)
        rows = [2 * count for count in self._slots.spans()]
        spans = powers_of_two(64, self.decoder.length)
        k = self.decoder.codebooks

        def blank(key: Key) -> list[torch.Tensor]:
            rows, _ = key
            size = _inputs_size(rows, k)
            return [torch.zeros(size, dtype=torch.int64, device=self.device)]

        label = f"{self.name} ({rows[-1]} rows at most, {self.decoder.length} positions)"
        with torch.no_grad(), self.autocast():
            self._graphs.prepare([(r, s) for r in rows for s in spans], blank, label=label)

    def finish(self, job: Job) -> None:
        # Free the slot and drop the buffers now rather than when the Job is collected.
        st = job.state
        if st is not None:
            self._release_slot(st)
            if self._in_flight is not None:  # (its codes in flight go unread)
                self._in_flight.forget(st)
        job.state = None

    def add_text(self, job: Job, text: str, *, flush: bool, end: bool) -> None:
        raise Unsupported("a music description does not come in parts", field="text_stream")

    def waiting(self, job: Job) -> bool:
        return False

    # -- for tests and benchmarks ----------------------------------------------------

    def codes_of(self, job: Job) -> torch.Tensor:
        """Every code ``[1, K, T]`` of a job so far (prompt included), as audiocraft returns."""
        st: _MusicGenJob = job.state
        return torch.from_numpy(_joined_codes(st.codes))


def _joined_codes(pieces: list[Codes | list[int]]) -> Codes:
    """``[1, K, T]``: codes kept as arrays ``[1, K, n]`` and as single
    timesteps ``[K]`` of ints, in order, joined."""
    arrays: list[Codes] = []
    frames: list[list[int]] = []
    for piece in pieces:
        if isinstance(piece, list):
            frames.append(piece)
            continue
        if frames:
            arrays.append(frames_to_codes(frames))
            frames = []
        arrays.append(piece)
    if frames:
        arrays.append(frames_to_codes(frames))
    return np.concatenate(arrays, axis=-1)


def _inputs_size(rows: int, k: int) -> int:
    return rows * (k + 2) + rows // 2 * k


def _split_inputs(flat: Any, rows: int, k: int) -> tuple[Any, Any, Any, Any]:
    """A step's inputs, in one int64 array (one copy to the device; numpy or
    torch): every row's codes ``[rows, K]``, which rows advance ``[rows]``, every
    slot's sampling keys ``[rows / 2, K]`` (``codebook_keys``), and (the graphed
    step) which rows' logits come from their prefill ``[rows]``."""
    a, b, c = rows * k, rows * (k + 1), rows * (k + 1) + rows // 2 * k
    return flat[:a].reshape(rows, k), flat[a:b], flat[b:c].reshape(rows // 2, k), flat[c:]


def _seeded_state(seed: int) -> Any:
    return random.Random(seed).getstate()


def _too_short(role: str) -> InvalidField:
    """An uploaded clip that resamples to no sample at the model's rate."""
    return InvalidField(
        f"inputs.{role} is too short: not one sample at the model's rate",
        field=f"inputs.{role}",
    )
