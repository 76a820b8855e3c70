"""MusicGen (audiocraft) behind the step interface.

``LMModel.generate`` returns nothing until the whole clip is done, so the LM is
stepped here by hand: the same delay pattern, streaming KV state and
classifier-free guidance as ``LMModel.generate``, one sequence step per
``step`` call. As soon as a timestep has all its codebooks it goes to the
``StreamDecoder``, which emits exact audio chunks.

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

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from audiocraft.models.musicgen import MusicGen
from audiocraft.modules.conditioners import ClassifierFreeGuidanceDropout

from wavecast.protocol import InvalidField, ModelInfo, ParamSpec

from .base import SEED_SPEC, EngineRequest, FloatAudio, Job, StepOutput, number, request_seed
from .codec_stream import DecodePlan, StreamDecoder, decode_batched
from .mbd import MBDRun
from .musicgen_decoder import MusicGenDecoder
from .sampling import RowSampling, sample
from .tiny import (
    RANDOM_MUSICGEN_SCALES,
    TINY_MUSICGEN,
    TINY_MUSICGEN_MELODY,
    TINY_MUSICGEN_STEREO,
    build_random_musicgen,
    build_tiny_musicgen,
    load_musicgen_dir,
)

__all__ = ["MusicGenEngine", "StreamSettings", "load_musicgen"]

log = logging.getLogger(__name__)

UNKNOWN_TOKEN = -1


@dataclass(frozen=True, slots=True)
class StreamSettings:
    """How codes become audio chunks (see ``StreamDecoder``)."""

    left_context: int = 25
    holdback: int = 4
    first_frames: int = 1
    chunk_frames: int = 10


def load_musicgen(name: str, device: str) -> tuple[MusicGen, bool]:
    """Load a MusicGen model by name.

    Args:
        name: ``tiny-musicgen``, ``tiny-musicgen-stereo``, ``tiny-musicgen-melody``,
            ``random-musicgen-{small,medium,large}`` (real
            shapes, random weights: for benchmarks), a local checkpoint directory,
            or a Hugging Face name such as ``facebook/musicgen-small``.
        device: torch device string.

    Returns:
        The model and whether it is a random-weight test model.
    """
    if name in (TINY_MUSICGEN, TINY_MUSICGEN_STEREO, TINY_MUSICGEN_MELODY):
        stereo, melody = name == TINY_MUSICGEN_STEREO, name == TINY_MUSICGEN_MELODY
        return build_tiny_musicgen(device=device, stereo=stereo, melody=melody), True
    if name.startswith("random-musicgen-") and name[16:] in RANDOM_MUSICGEN_SCALES:
        return build_random_musicgen(name[16:], device=device), True
    path = Path(name).expanduser()
    if path.is_dir():
        model = load_musicgen_dir(path, device=device)
        return model, model.lm.cfg.get("wavecast_test_model", False) is True
    return MusicGen.get_pretrained(name, device=device), False


@dataclass(slots=True)
class _Layout:
    """Where each timestep's codes land in the pattern sequence."""

    positions: torch.Tensor  # [K, T]: sequence step holding codebook k of timestep t
    ready_after: list[int]  # timesteps complete once sequence step s is written


@dataclass(slots=True)
class _Window:
    """One ``LMModel.generate`` run: a pattern sequence filled step by step."""

    gen_sequence: Any  # [1, K, S] pattern sequence being filled
    mask: Any  # [K, S] valid positions of the pattern
    layout: _Layout
    start_offset: int
    end_offset: int
    offset: int
    prompt_len: int  # timesteps given as prompt (known before the first step)
    ready: int = 0  # timesteps with every codebook known
    prefilled: bool = False  # its prompt is in the decoder's KV cache


@dataclass(slots=True)
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
    window: _Window
    gen_offset: int = 0  # audiocraft's current_gen_offset
    produced: int = 0  # new timesteps generated so far
    codes: list[Any] = field(default_factory=list)  # every timestep's codes, in order
    attributes: list[Any] = field(default_factory=list)  # audiocraft ConditioningAttributes
    melody: Any = None  # the reference clip's WavCondition (melody models)
    py_random: Any = None  # state of Python's `random` for this request (Demucs' shifts)
    seed: int = 0
    mbd: bool = False  # render a Multi-Band Diffusion version once the codes are known
    mbd_run: MBDRun | None = None
    skip_frames: int = 0  # prompt frames not streamed (continuation without include_prompt)
    pending_audio: FloatAudio | None = None  # the prompt's audio, with include_prompt
    slot: int | None = None  # rows 2 * slot (conditional) and 2 * slot + 1 of the decoder
    kv_length: int = 0  # positions of its rows in the decoder's KV cache


class MusicGenEngine:
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
    """

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
    ) -> None:
        self.model = model
        self.mbd = mbd
        self.name = name
        self.lm = model.lm
        self.test_model = test_model
        self.device = next(iter(self.lm.parameters())).device
        self.stream = stream or StreamSettings()
        self.window = float(model.max_duration)
        self.max_duration = float(max(max_duration or self.window, self.window))
        self.max_upload_seconds = max_upload_seconds
        self.frame_rate = float(model.frame_rate)
        self.hop = round(model.sample_rate / model.frame_rate)
        self._layouts: dict[int, _Layout] = {}
        autocast = getattr(model.autocast, "autocast", None)
        dtype = autocast.fast_dtype if autocast is not None else next(self.lm.parameters()).dtype
        window_steps = int(self.window * self.frame_rate) + int(self.lm.num_codebooks) + 1
        self.decoder = MusicGenDecoder(
            self.lm, rows=2, length=window_steps, cross_length=16, dtype=dtype
        )
        self._slots: list[_MusicGenJob | None] = [None]
        self._sampling = RowSampling(1, self.device)
        self._cfg = torch.zeros(1, device=self.device)
        self._due: list[tuple[StepOutput, StreamDecoder, DecodePlan]] = []
        # Called with each step's guided logits by request id (tests compare rows).
        self.logits_observer: Callable[[dict[str, torch.Tensor]], None] | None = None
        card = int(self.lm.card)
        long_form = self.max_duration > self.window
        params = [
            ParamSpec(
                "duration",
                "float",
                min(10.0, self.window),
                0.1,
                self.max_duration,
                description="seconds of audio to generate (with continuation: in all)",
            ),
            ParamSpec(
                "top_k",
                "int",
                min(250, card),
                0,
                card,
                description="sample among the k most likely tokens (0: all)",
            ),
            ParamSpec(
                "top_p",
                "float",
                0.0,
                0.0,
                1.0,
                description="nucleus sampling threshold (0: use top_k)",
            ),
            ParamSpec(
                "temperature",
                "float",
                1.0,
                0.0,
                10.0,
                description="softmax temperature (0: greedy)",
            ),
            ParamSpec(
                "cfg_coef",
                "float",
                3.0,
                0.0,
                30.0,
                description="classifier-free guidance strength",
            ),
            SEED_SPEC,
            ParamSpec(
                "include_prompt",
                "bool",
                False,
                description="with continuation: stream the prompt's audio too",
            ),
        ]
        if mbd is not None:
            params.append(
                ParamSpec(
                    "mbd",
                    "bool",
                    False,
                    description="also render a Multi-Band Diffusion version (higher quality, "
                    "sent when generation ends)",
                )
            )
        capabilities = ["text", "continuation"]
        if long_form:
            stride = min(18.0, round(self.window * 0.6, 3))
            params.append(
                ParamSpec(
                    "extend_stride",
                    "float",
                    stride,
                    round(self.window * 0.1, 3),
                    round(self.window - 1.0 / self.frame_rate, 3),
                    description="long form: seconds each new window moves on by",
                )
            )
            capabilities.append("long_form")
        self.melody = "self_wav" in self.lm.condition_provider.conditioners
        if self.melody:
            capabilities.insert(1, "melody")
        if int(model.audio_channels) == 2:
            capabilities.append("stereo")
        if mbd is not None:
            capabilities.append("mbd")
        self._params = tuple(params)
        label = (
            "random-weight test model, makes noise"
            if test_model
            else "text and melody to music"
            if self.melody
            else "text to music"
        )
        self._info = ModelInfo(
            name=name,
            family=self.family,
            description=f"MusicGen {name} ({label})",
            sample_rate=int(model.sample_rate),
            channels=int(model.audio_channels),
            test_model=test_model,
            max_duration=self.max_duration,
            params=self._params,
            capabilities=tuple(capabilities),
        )

    @property
    def info(self) -> ModelInfo:
        return self._info

    # -- preparation ---------------------------------------------------------------

    def _layout(self, gen_len: int) -> _Layout:
        layout = self._layouts.get(gen_len)
        if layout is None:
            pattern = self.lm.pattern_provider.get_pattern(gen_len)
            k = self.lm.num_codebooks
            positions = torch.zeros((k, gen_len), dtype=torch.long)
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
            layout = _Layout(positions.to(self.device), ready_after)
            if len(self._layouts) > 64:
                self._layouts.clear()
            self._layouts[gen_len] = layout
        return layout

    def prepare(self, request: EngineRequest) -> Job:
        with torch.no_grad():
            return self._prepare(request)

    def _upload_wav(self, data: bytes, role: str) -> torch.Tensor:
        """Decode an uploaded clip to ``[C, T]`` at the model's rate and channel count."""
        from audiocraft.data.audio_utils import convert_audio

        from ..audio import decode_upload

        audio, rate = decode_upload(
            data, field=f"inputs.{role}", max_seconds=self.max_upload_seconds
        )
        wav = torch.from_numpy(audio.T.copy()).to(self.device)
        converted: torch.Tensor = convert_audio(
            wav, rate, self.model.sample_rate, self.model.audio_channels
        )
        return converted

    def _prompt_tokens(self, data: bytes) -> torch.Tensor:
        """Encode an uploaded clip into codes ``[1, K, T]`` (audiocraft's continuation)."""
        wav = self._upload_wav(data, "continuation").unsqueeze(0)
        with self.model.autocast:
            tokens, scale = self.model.compression_model.encode(wav)
        assert scale is None
        return tokens

    def _prepare(self, request: EngineRequest) -> Job:
        params = request.params
        duration = number(params["duration"])
        seed = request_seed(params)
        total_len = max(1, int(duration * self.frame_rate))

        prompt = None
        if "continuation" in request.inputs:
            prompt = self._prompt_tokens(request.inputs["continuation"])
            max_prompt = int(min(duration, self.window) * self.frame_rate)
            if prompt.shape[-1] >= min(total_len, max_prompt):
                prompt_seconds = prompt.shape[-1] / self.frame_rate
                raise InvalidField(
                    f"the continuation prompt ({prompt_seconds:.2f} s) must be shorter than "
                    f"duration and than the model's {self.window:g} s window",
                    field="inputs.continuation",
                )

        melody_wavs = None
        if "melody" in request.inputs:
            melody_wavs = [self._upload_wav(request.inputs["melody"], "melody")]
        if self.melody:
            attributes, _ = self.model._prepare_tokens_and_attributes(
                [request.prompt], None, melody_wavs=melody_wavs
            )
        else:
            attributes, _ = self.model._prepare_tokens_and_attributes([request.prompt], None)
        melody = attributes[0].wav.get("self_wav")
        if duration > self.window and melody is not None:
            self._wrap_melody(attributes, melody, 0)
        cfg_conditions, py_random = self._cfg_conditions(attributes, _seeded_state(seed))

        stride_seconds = number(params.get("extend_stride") or 18.0)
        decoder = StreamDecoder(
            self._decode,
            self.hop,
            left_context=self.stream.left_context,
            holdback=self.stream.holdback,
            first_frames=self.stream.first_frames,
            chunk_frames=self.stream.chunk_frames,
        )
        first_prompt_len = 0 if prompt is None else int(prompt.shape[-1])
        job = _MusicGenJob(
            cfg_conditions=cfg_conditions,
            cfg_coef=number(params["cfg_coef"]),
            decoder=decoder,
            temperature=number(params["temperature"]),
            top_k=int(number(params["top_k"])),
            top_p=number(params["top_p"]),
            duration=duration,
            total_len=total_len,
            first_prompt_len=first_prompt_len,
            stride=int(self.frame_rate * stride_seconds),
            window=self._new_window(duration, 0, prompt),
            attributes=attributes,
            melody=melody,
            py_random=py_random,
            seed=seed,
            mbd=bool(params.get("mbd")) and self.mbd is not None,
        )
        if prompt is not None:
            job.codes.append(prompt)
            if params.get("include_prompt"):
                job.pending_audio = decoder.push(prompt)
            else:
                decoder.prime(prompt)
                job.skip_frames = first_prompt_len
        return Job(request=request, state=job, extra={"seed": seed})

    def _cfg_conditions(self, attributes: list[Any], py_random: Any) -> tuple[Any, Any]:
        """Condition tensors for the conditional and the null half, as LMModel.generate.

        Demucs (melody models) shifts its input at random with Python's ``random``:
        each request keeps its own state of it, so that its seed reproduces it.
        Returns the tensors and the new state.
        """
        lm = self.lm
        random.setstate(py_random)
        with self.model.autocast:
            null = ClassifierFreeGuidanceDropout(p=1.0)(attributes)
            tokenized = lm.condition_provider.tokenize(attributes + null)
            conditions = lm.condition_provider(tokenized)
        return conditions, random.getstate()

    def _wrap_melody(self, attributes: list[Any], melody: Any, gen_offset: int) -> None:
        """Long form: the melody for the window at ``gen_offset``, repeated as needed.

        The same as ``MusicGen._generate_tokens``: each window sees the reference
        from its own start time on, wrapped around when the reference is shorter.
        """
        from audiocraft.modules.conditioners import WavCondition

        wav_length = int(melody.length.item())
        if wav_length == 0:
            return
        time_offset = gen_offset / self.frame_rate
        initial_position = int(time_offset * self.model.sample_rate)
        target_length = int(self.window * self.model.sample_rate)
        positions = torch.arange(
            initial_position, initial_position + target_length, device=self.device
        )
        attributes[0].wav["self_wav"] = WavCondition(
            melody[0][..., positions % wav_length],
            torch.full_like(melody[1], target_length),
            [self.model.sample_rate] * melody[0].size(0),
            [None],
            [0.0],
        )

    def _new_window(self, duration: float, gen_offset: int, prompt: Any) -> _Window:
        """A window as ``MusicGen._generate_tokens`` starts one (same lengths)."""
        time_offset = gen_offset / self.frame_rate
        chunk_duration = min(duration - time_offset, self.window)
        gen_len = int(chunk_duration * self.frame_rate)
        lm = self.lm
        pattern = lm.pattern_provider.get_pattern(gen_len)
        gen_codes = torch.full(
            (1, lm.num_codebooks, gen_len), UNKNOWN_TOKEN, dtype=torch.long, device=self.device
        )
        prompt_len = 0
        if prompt is not None:
            prompt_len = int(prompt.shape[-1])
            gen_codes[..., :prompt_len] = prompt
        gen_sequence, _, mask = pattern.build_pattern_sequence(gen_codes, lm.special_token_id)
        start_offset = pattern.get_first_step_with_timesteps(prompt_len)
        assert start_offset is not None
        return _Window(
            gen_sequence=gen_sequence,
            mask=mask,
            layout=self._layout(gen_len),
            start_offset=start_offset,
            end_offset=int(gen_sequence.shape[-1]),
            offset=start_offset,
            prompt_len=prompt_len,
            ready=prompt_len,
        )

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model.compression_model.decode(codes, None)
        return out

    # -- stepping ------------------------------------------------------------------

    def step(self, jobs: Sequence[Job]) -> list[StepOutput]:
        with torch.no_grad(), self.model.autocast:
            outputs: list[StepOutput | None] = [None] * len(jobs)
            generating: list[tuple[int, Job]] = []
            for i, job in enumerate(jobs):
                run = job.state.mbd_run
                if run is not None:
                    outputs[i] = self._step_mbd(job, run)
                else:
                    generating.append((i, job))
            if generating:
                states = [job.state for _, job in generating]
                tokens, guided = self._sample_step(states)
                if self.logits_observer is not None:
                    self.logits_observer(
                        {job.request.request_id: guided[job.state.slot] for _, job in generating}
                    )
                self._due.clear()
                for (i, job), st in zip(generating, states, strict=True):
                    assert st.slot is not None
                    outputs[i] = self._advance(job, tokens[st.slot])
                self._decode_due()
        return [out for out in outputs if out is not None]

    def _decode_due(self) -> None:
        """Decode every stream's due codec window in one batched call per window shape."""
        if not self._due:
            return
        due, self._due = self._due, []
        wavs = decode_batched(self._decode, [plan for _, _, plan in due])
        for (output, decoder, plan), wav in zip(due, wavs, strict=True):
            chunk = decoder.complete(plan, wav)
            output.audio = chunk if output.audio is None else np.concatenate([output.audio, chunk])

    # -- the slot table --------------------------------------------------------------

    def _take_slot(self, st: _MusicGenJob) -> None:
        try:
            slot = self._slots.index(None)
        except ValueError:
            slot = len(self._slots)
            self._grow(slot + 1)
        self._slots[slot] = st
        st.slot = slot
        self._sampling.set_row(
            slot,
            temperature=st.temperature,
            top_k=st.top_k,
            top_p=st.top_p,
            seed=st.seed,
        )
        self._cfg[slot] = st.cfg_coef

    def _grow(self, slots: int) -> None:
        self.decoder.ensure(rows=2 * slots)
        count = self.decoder.rows // 2
        old = len(self._slots)
        self._slots.extend([None] * (count - old))
        sampling = RowSampling(count, self.device)
        for name in ("temperature", "top_k", "top_p", "seed", "step"):
            getattr(sampling, name)[:old] = getattr(self._sampling, name)
        self._sampling = sampling
        self._cfg = torch.cat([self._cfg, self._cfg.new_zeros(count - old)])

    def _release_slot(self, st: _MusicGenJob) -> None:
        if st.slot is not None and self._slots[st.slot] is st:
            self._slots[st.slot] = None
        st.slot = None

    def _prefill(self, st: _MusicGenJob) -> torch.Tensor:
        """Load a window's conditioning and prompt into the request's rows.

        Returns the pair's logits ``[2, K, card]`` for the window's next step.
        """
        assert st.slot is not None
        win = st.window
        rows = [2 * st.slot, 2 * st.slot + 1]
        lm = self.lm
        # The fuser prepends what it prepends (a melody's chroma) and returns the
        # cross-attention source (the text), as at the first step of LMModel.generate.
        empty = torch.zeros(2, 0, self.decoder.dim, device=self.device)
        prepend, cross = lm.fuser(empty, st.cfg_conditions)
        self.decoder.set_conditions(rows, cross)
        codes = win.gen_sequence[..., : win.offset].expand(2, -1, -1)
        inputs = torch.cat([prepend.to(empty.dtype), self.decoder.embed(codes)], dim=1)
        self.decoder.ensure(length=int(prepend.shape[1]) + win.end_offset + 1)
        logits = self.decoder.prefill(rows, inputs)
        st.kv_length = int(inputs.shape[1])
        win.prefilled = True
        return logits

    def _sample_step(self, states: list[_MusicGenJob]) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward for every request (prefilling new windows), one draw per row.

        Returns the sampled codes ``[slots, K]`` and the guided logits
        ``[slots, K, card]``; a request's are at its slot.
        """
        for st in states:
            if st.slot is None:
                self._take_slot(st)
        prefilled: dict[int, torch.Tensor] = {}
        for st in states:
            if not st.window.prefilled:
                assert st.slot is not None
                prefilled[st.slot] = self._prefill(st)
        decoder = self.decoder
        k = decoder.codebooks
        active = torch.zeros(decoder.rows, dtype=torch.bool, device=self.device)
        if len(prefilled) < len(states):
            codes = torch.zeros(decoder.rows, k, dtype=torch.long, device=self.device)
            for st in states:
                if st.slot is not None and st.slot not in prefilled:
                    column = st.window.gen_sequence[0, :, st.window.offset - 1]
                    codes[2 * st.slot : 2 * st.slot + 2] = column
                    active[2 * st.slot : 2 * st.slot + 2] = True
            # Attend over the longest row's positions, rounded up to a multiple of
            # 64 (a handful of shapes per window length).
            longest = max(st.kv_length for st in states if st.slot not in prefilled)
            logits = decoder.decode(codes, active, span=-(-(longest + 1) // 64) * 64).float()
            for st in states:
                if st.slot not in prefilled:
                    st.kv_length += 1
        else:
            logits = torch.zeros(decoder.rows, k, int(self.lm.card), device=self.device)
        for slot, pair in prefilled.items():
            logits[2 * slot : 2 * slot + 2] = pair.float()
        cond, uncond = logits[0::2], logits[1::2]
        guided = uncond + (cond - uncond) * self._cfg[:, None, None]
        sampling = self._sampling
        tokens = sample(
            guided,
            sampling.temperature,
            sampling.top_k,
            sampling.top_p,
            sampling.seed,
            sampling.step,
        )
        stepped = torch.zeros(len(self._slots), dtype=torch.int64, device=self.device)
        for st in states:
            stepped[st.slot] = 1
        sampling.step += stepped
        return tokens, guided

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

    def _advance(self, job: Job, sampled: torch.Tensor) -> StepOutput:
        """Write a request's sampled codes ``[K]`` into its window and stream what is ready."""
        st: _MusicGenJob = job.state
        win = st.window
        lm = self.lm
        offset = win.offset
        next_token = sampled.view(1, -1, 1).clone()
        valid = win.mask[..., offset : offset + 1].expand(1, -1, -1)
        next_token[~valid] = lm.special_token_id
        column = win.gen_sequence[..., offset : offset + 1]
        win.gen_sequence[..., offset : offset + 1] = torch.where(
            column == UNKNOWN_TOKEN, next_token, column
        )
        win.offset = offset + 1
        job.steps += 1

        pieces = []
        if st.pending_audio is not None:
            pieces.append(st.pending_audio)
            st.pending_audio = None
        plan = None
        ready = win.layout.ready_after[offset]
        if ready > win.ready:
            codes = torch.gather(win.gen_sequence[0], 1, win.layout.positions[:, win.ready : ready])
            codes = codes.unsqueeze(0)
            st.produced += ready - win.ready
            win.ready = ready
            st.codes.append(codes)
            plan = st.decoder.plan_push(codes)
        done = False
        if win.offset >= win.end_offset:
            done = self._next_window(st)
        if plan is not None and done:
            pieces.append(st.decoder.complete(plan, self._decode(plan.window)))
            plan = None
        if done:
            tail = st.decoder.flush()
            if tail is not None:
                pieces.append(tail)
        audio = None if not pieces else pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        if done and st.mbd:
            # The live stream is complete; the diffusion version follows, step by step.
            self._release_slot(st)
            generator = torch.Generator(device=self.device)
            generator.manual_seed(st.seed)
            codes = torch.cat(st.codes, dim=-1)
            if int(self.model.audio_channels) == 2:
                # As audiocraft's MusicGen demo: each channel's codes through the
                # mono MBD, as a batch of two.
                left, right = self.model.compression_model.get_left_right_codes(codes)
                codes = torch.cat([left, right])
            st.mbd_run = MBDRun(self.mbd, codes, generator)
            return StepOutput(
                audio=audio, fraction=1.0, seconds=st.produced / self.frame_rate, done=False
            )
        target = st.total_len - st.first_prompt_len
        fraction = 1.0 if done else min(0.999, st.produced / target) if target > 0 else 0.0
        output = StepOutput(
            audio=audio, fraction=fraction, seconds=st.produced / self.frame_rate, done=done
        )
        if plan is not None:
            self._due.append((output, st.decoder, plan))
        return output

    def _next_window(self, st: _MusicGenJob) -> bool:
        """The current window is complete: start the next one, or report the end.

        Mirrors the loop of ``MusicGen._generate_tokens``: move on by ``stride``
        timesteps and prompt the next window with what follows in this one.
        """
        win = st.window
        window_codes = torch.gather(win.gen_sequence[0], 1, win.layout.positions).unsqueeze(0)
        st.gen_offset += st.stride
        prompt = window_codes[..., st.stride :]
        if st.gen_offset + prompt.shape[-1] >= st.total_len or st.duration <= self.window:
            return True
        st.window = self._new_window(st.duration, st.gen_offset, prompt)
        if st.melody is not None and int(st.melody.length.item()) > 0:
            self._wrap_melody(st.attributes, st.melody, st.gen_offset)
            st.cfg_conditions, st.py_random = self._cfg_conditions(st.attributes, st.py_random)
        return False

    def finish(self, job: Job) -> None:
        # Free the slot and drop the buffers now rather than when the Job is collected.
        if job.state is not None:
            self._release_slot(job.state)
        job.state = None

    # -- reference path, for tests and benchmarks ----------------------------------

    def codes_of(self, job: Job) -> torch.Tensor:
        """Every code ``[1, K, T]`` of a job so far (prompt included), as audiocraft returns."""
        st: _MusicGenJob = job.state
        return torch.cat(st.codes, dim=-1)


def _seeded_state(seed: int) -> Any:
    return random.Random(seed).getstate()
