"""HiggsAudio v2 text-to-speech behind the step interface.

transformers' ``HiggsAudioV2ForConditionalGeneration.generate`` returns the
audio codes only when the whole utterance is done, so its decoding loop is
stepped here by hand, one audio frame per ``step``: the same prompt layout as
``HiggsAudioV2Processor`` (reference audio as delay-pattern code blocks behind
``<|AUDIO_OUT|>`` placeholders), the same delay pattern
(``HiggsAudioV2DelayPatternLogitsProcessor``) and sampling warpers, the same
repetition-aware sampling (RAS) and stopping.

Every request has a row of one batched decoder (``HiggsDecoder``, over the
model's own weights, with a static KV cache): a step prefills what is due of new
prompts (bounded), runs one forward for every decoding row, draws every row's
codes with its own parameters (``sampling.warp``, counter-based noise: a seed
gives the same speech alone or beside others), and copies the codes back once.
The delay pattern and the stop rules run on the host, per row. Greedy, the
codes equal ``generate``'s; ``testing.higgs_reference`` (transformers' forward,
each request alone, its torch generator) equals ``generate`` sampled too, and
this engine is tested against it.

A frame of audio is complete once its last codebook has been sampled (the
delay pattern puts codebook ``k`` ``k`` steps late); complete frames go to the
request's stream decoder at once (``codec_stream.CodecStreams``), which emits
exact audio chunks.

Long texts are split into chunks (by speaker turn or by word count) and spoken
one after another as the original HiggsAudio generation loop does: each chunk is
a new user turn, and the audio generated for earlier chunks stays in the
context as the assistant's answers, so the voice carries on. The next chunk's
prompt extends the last one's with its answer, so the KV cache is carried over
as far as the two agree and only the new turn is prefilled. The codes of every
chunk go through one decoder, so the stream runs on across chunks with no seam.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from wavecast.protocol import InvalidField, ModelInfo, ParamValue

from ..base import (
    EngineRequest,
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
from ..pieces import measured, run_through, without_grad
from ..pipelining import CodecPlace, Launched, read_back, to_device
from ..precision import dtype_name
from ..prefill import PrefillBudget, choose, feed
from ..prefixes import PrefixStore
from ..sampling import (
    RowSampling,
    finite_rows,
    sample_repeat_aware,
)
from ..slots import SlotTable
from .card import model_card
from .decoder import HiggsDecoder
from .encoding import encode_in_pieces, parts_of
from .loading import HiggsModel
from .prompt import (
    AUDIO_DELAY,
    AUDIO_OUT,
    MULTISPEAKER_SYSTEM,
    SPEAKER_TAG,
    SYSTEM,
    PromptAudio,
    PromptPart,
    build_preamble,
    build_prompt,
    chunk_text,
    delay_block,
    normalize_text,
    speakable,
    turn_parts,
    user_turn,
)
from .rules import RowRules
from .utterance import Markers, Utterance
from .voices import Scene, Voice, VoiceLoadError, scene_text

__all__ = ["HiggsEngine"]

log = logging.getLogger(__name__)

DEFAULT_MODEL = "bosonai/higgs-audio-v2-generation-3B-base"
REFERENCE_ROLES = ("reference", "reference_1")

# -- per-request state ------------------------------------------------------------


Ints = npt.NDArray[np.int64]


@dataclass(slots=True, weakref_slot=True)  # (tests: nothing keeps a finished one)
class _HiggsJob:
    chunks: list[str]
    system: str
    scene: str
    speakers: list[tuple[str, PromptAudio]]
    references: list[tuple[str, PromptAudio]]
    history: list[tuple[str, PromptAudio]]
    buffer_size: int | None
    temperature: float
    top_k: int
    top_p: float
    max_new_tokens: int
    ras_win_len: int
    ras_max_repeat: int
    decoder: StreamDecoder
    max_frames: int
    index: int = 0
    chunk_frames: list[list[int]] = field(default_factory=list)  # frames [K] of this chunk
    produced: int = 0
    expected: float = 1.0
    fraction: float = 0.0
    # The request's row, its chunk under way and the last one.
    seed: int = 0
    slot: int | None = None
    utterance: Utterance | None = None
    spoken: Utterance | None = None
    # The prompt's beginning shared with other requests (``PrefixStore``): its
    # content, and its positions; until its keys and values are in the row.
    sharing: tuple[bytes, int] | None = None
    # Pipelined steps: what a step read while the scheduler left it out of a
    # step (given at its next one).
    held: StepOutput | None = None
    # Rows drawn so far, every chunk's (the codes sent with the audio count them).
    drawn: int = 0
    # Picked up from its codes (``_pick_up``): the rows of the chunk under way
    # known before (its utterance opens with them), the draws made before, and
    # the known frames' audio (made again as it is prepared, sent first).
    known: list[list[int]] | None = None
    first_draw: int = 0
    remade: Ints | None = None
    pending_audio: npt.NDArray[np.float32] | None = None
    # What failed as its first step was begun (``begin``): it fails in that step.
    failed: BaseException | None = None
    # Its text comes as it is written (``text_stream``): more may come until it
    # ends; what came and is not a whole sentence yet (``add_text``).
    text_open: bool = False
    unspoken: str = ""
    # Its codec stream ended where it waited for text: the next chunk's audio
    # goes on from it (``_continued``).
    paused: bool = False
    # Its prompts' beginning up to the chunks spoken so far, tokenized
    # (``_chunk_tokens``): its ids, its audio rows, and the chunks it holds.
    head: tuple[Ints, Ints, int] | None = None


class HiggsEngine(TableSizing):
    """A loaded HiggsAudio v2 model served through the step interface.

    Args:
        loaded: The model, tokenizer and codec.
        name: The name clients use.
        voices: Named reference voices.
        scenes: Named scene descriptions.
        max_new_tokens: Largest ``max_new_tokens`` a request may ask for.
        max_duration: Longest audio one request may produce, in seconds.
        max_upload_seconds: Longest uploaded reference clip.
        left_context, holdback, first_frames, chunk_frames, max_chunk_frames:
            Geometry of the exact incremental decoder (see ``codec_stream``).
        codec_batch: Chunks one codec call decodes at most (many streams due
            in a step); None: measured at warm-up (``fastest_rows``).
        codec_windows: Re-decode windows of codes even though the codec's
            decoder runs incrementally (``codec_incremental``; to compare).
        prefill_chunk: Prompt positions a request prefills per call at most.
        prefill_budget: Prompt positions prefilled per step at most, padding
            included (the oldest prompt's chunk goes in, cut to this if need
            be), so that new requests delay the running streams by a
            bounded time per step; with a time budget, what bounds one step's
            prefill (its activations) where the time would buy more.
        prefill_budget_ms: A time budget for the same (``--prefill-budget-ms``):
            the positions per step follow the measured prefill speed (at most
            ``prefill_budget``, at least one position); None: positions only.
        prefix_cache: Bytes of keys and values kept of prompt beginnings that
            requests share (the system text, scene and reference voices:
            ``PrefixStore``; ``--prefix-cache-mb``); 0: none kept.
        cuda_graphs: Replay the batched decode step as CUDA graphs, one per
            shape (``graphs``; on a CPU the same buffers, eagerly). The slot
            table is then preallocated for ``max_active`` requests, each with
            room for a default request (1024 prompt positions and the default
            ``max_new_tokens``), and every shape is recorded at warm-up.
        max_active: Requests the scheduler decodes at once; 0: as many as
            the device's memory holds, found at warm-up (``kv.room_for``).
        memory_share: The part of the device's free memory (at ``size``) that
            ``max_active`` 0 sizes the table in (the server's models divide it).
        pipelined: Launch each call's step before reading the last one's
            codes (the rows' rules are on the device: ``RowRules``), then
            take each request's row, decode the audio and return the outputs
            (``pipelining``): on a GPU the host's whole part of a step runs
            while the device computes the next one. The same draws; each
            step's outputs come a call later (``_step_pipelined``).

    The codec's decoder is prepared for serving in place
    (``codec_decoders.for_serving``: the same audio, without per-call waste).
    """

    decoder: HiggsDecoder

    family = "higgs"
    # Shared beginnings whose tokens are kept (``_shared_beginning``).
    PREAMBLES = 64

    def __init__(
        self,
        loaded: HiggsModel,
        *,
        name: str,
        voices: Mapping[str, Voice] | None = None,
        scenes: Mapping[str, Scene] | None = None,
        max_new_tokens: int = 2048,
        max_duration: float = 300.0,
        max_upload_seconds: float = 60.0,
        left_context: int = 12,
        holdback: int = 11,
        first_frames: int = 1,
        chunk_frames: int = 8,
        max_chunk_frames: int = 50,
        codec_batch: int | None = None,
        codec_windows: bool = False,
        prefill_chunk: int = 256,
        prefill_budget: int = 4096,
        prefill_budget_ms: float | None = None,
        prefix_cache: int = 256 * 2**20,
        clock: Callable[[], float] = time.perf_counter,
        cuda_graphs: bool = False,
        max_active: int = 4,
        memory_share: float = 1.0,
        pipelined: bool = False,
    ) -> None:
        self.model = loaded.model
        self.pipelined = pipelined
        self._asked_active = max_active  # (0: as many as fit, at warm-up)
        self.max_active = max(1, max_active)
        self.memory_share = memory_share
        self.tokenizer = loaded.tokenizer
        self.codec = loaded.codec
        prepared = for_serving(self.codec.acoustic_decoder)  # the same audio, sooner
        log.debug("%s: codec decoder prepared for serving: %s", name, prepared)
        self.name = name
        self.voices = dict(voices or {})
        self.scenes = dict(scenes or {})
        self.max_upload_seconds = max_upload_seconds
        self.max_chunk_frames = max_chunk_frames
        config = self.model.config
        self.device = next(iter(self.model.parameters())).device
        self.num_codebooks = int(config.num_codebooks)
        self.stream_bos = int(config.audio_stream_bos_id)
        self.stream_eos = int(config.audio_stream_eos_id)
        self.sample_rate = int(self.codec.config.sample_rate)
        self.hop = int(self.codec.config.hop_length)
        self.frame_rate = self.sample_rate / self.hop
        self.context_cost = 0.0  # seconds a step per stream-second of context (warm-up)
        self.codec_seconds = 0.0  # host seconds in the streams' codec calls, so far
        self.context_seconds: float | None = None  # a row's context grows to its end
        self._warm = False
        self._sized: int | None = None  # (max_active as ``size`` found it)
        self.prefill_chunk = max(1, prefill_chunk)
        seconds = None if prefill_budget_ms is None else prefill_budget_ms / 1000
        self.prefill = PrefillBudget(prefill_budget, seconds, self.device, clock)
        self.prefixes = PrefixStore(prefix_cache)
        # Shared beginnings' tokens, by their parts (the most recently used last).
        self._preambles: dict[tuple[str | bytes, ...], tuple[Ints, Ints]] = {}
        self.audio_token = int(config.audio_token_id)
        self.delay_token = int(config.audio_delay_token_id)
        self.audio_bos_token = int(config.audio_bos_token_id)
        eos_id = config.eos_token_id
        self.end_token = int(eos_id if isinstance(eos_id, int) else eos_id[0])
        self.markers = Markers(
            codebooks=self.num_codebooks,
            stream_bos=self.stream_bos,
            stream_eos=self.stream_eos,
            audio=self.audio_token,
            delay=self.delay_token,
            audio_bos=self.audio_bos_token,
            end=self.end_token,
        )
        self.decoder = HiggsDecoder(self.model, rows=1, length=256)
        self._rules = RowRules(1, self.markers, self.decoder.card, self.device)
        self._graphs = None
        self._prefilled = PrefilledLogits(1, self.num_codebooks, self.decoder.card, self.device)
        # A step's inputs' places by its rows (``_parts``): as many as the table's rows.
        self._cuts: dict[int, list[int]] = {}
        if cuda_graphs:
            record = self.device.type == "cuda"
            self._graphs = StepGraphs(self._graphed_step, self.decoder.storage, record=record)
        self._sampling = RowSampling(1, self.device, vocab=self.decoder.card)
        self._ras_len = np.zeros(1, dtype=np.int64)
        self._ras_max = np.ones(1, dtype=np.int64)
        self._slots: SlotTable[_HiggsJob] = SlotTable(self._grow)
        self._due: Due = []
        # Streams' ends due this step: in the same calls' kind, but timed as the
        # step's, not as ``codec_seconds`` (what a running stream's chunks cost).
        self._ends: Due = []
        self.codec_batch = codec_batch
        geometry = StreamGeometry(
            left_context, holdback, first_frames, chunk_frames, max_chunk_frames, self.frame_rate
        )
        self._in_flight: Launched[_HiggsJob] | None = None
        # Pipelined on CUDA, the codec runs on a stream of its own: reading its
        # audio back waits for its calls only, not for the decode step in flight.
        self._codec_place = CodecPlace(self.device, pipelined)
        with torch.no_grad(), self._codec_place():
            self.codec_streams = CodecStreams(
                self.codec,
                self._decode,
                next(iter(self.codec.acoustic_decoder.parameters())),
                geometry,
                hop=self.hop,
                codebooks=self.num_codebooks,
                cardinality=int(self.codec.config.codebook_size),
                name=name,
                windows=codec_windows,
            )
        self.codec_streams.cadence.rows = codec_batch
        self.codec_streams.record_calls(cuda_graphs and self.device.type == "cuda")
        # Tests: called with each sampled request's raw logits [K, card], by id.
        self.logits_observer: Callable[[dict[str, torch.Tensor]], None] | None = None
        self.max_duration = float(max_duration)
        self._voice_codes: dict[str, Ints] = {}
        # The prompt layout names these tokens; the model knows them by id.
        for token, expected in (
            (AUDIO_OUT, config.audio_token_id),
            (AUDIO_DELAY, config.audio_delay_token_id),
            ("<|audio_out_bos|>", config.audio_bos_token_id),
            ("<|audio_eos|>", None),
        ):
            got = self.tokenizer.convert_tokens_to_ids(token)
            unknown = got is None or got == self.tokenizer.unk_token_id
            if unknown or (expected is not None and int(got) != int(expected)):
                raise ValueError(
                    f"the text tokenizer does not match the model: {token} is "
                    f"{'unknown' if unknown else got}"
                    + ("" if expected is None else f", the model expects id {expected}")
                )
        self._grows_prompts = self._splits_at_turns()
        # The tokenizer's special tokens (the longest first, of those that begin
        # alike), which no text of a request may hold (``_check_text``).
        controls = sorted(
            (t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special),
            key=len,
            reverse=True,
        )
        self._controls = re.compile("|".join(map(re.escape, controls)) or r"(?!)")
        # The server's own texts too: refused at start, not in every request.
        texts = [(v.path.with_suffix(".txt"), v.transcript or "") for v in self.voices.values()]
        for path, text in texts + [(s.path, s.content) for s in self.scenes.values()]:
            if found := self._controls.search(text):
                raise VoiceLoadError(f"{path}: holds {found.group(0)}, a control token of {name}")
        # Named voices are encoded once, here, so that a request naming one pays
        # nothing for it (bounded: the voices folder is read once).
        with torch.no_grad():
            for voice in self.voices.values():
                self._voice_codes[voice.name] = self.encode_audio(voice.audio, voice.sample_rate)
        self._info = model_card(
            name=name,
            test_model=loaded.test_model,
            sample_rate=self.sample_rate,
            frame_rate=self.frame_rate,
            codebooks=self.num_codebooks,
            card=int(config.codebook_size),
            max_new_tokens=max_new_tokens,
            max_duration=self.max_duration,
            voices=tuple(self.voices),
            scenes=tuple(self.scenes),
            device=str(self.device),
            dtype=dtype_name(self.decoder.dtype),
        )
        self._params = self._info.params

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def graphs(self) -> StepGraphs | None:
        return self._graphs

    # -- preparation ---------------------------------------------------------------

    def prepare(self, request: EngineRequest) -> Job:
        return next(job for job in self.prepare_steps(request) if isinstance(job, Job))

    def prepare_steps(self, request: EngineRequest) -> Generator[Job | float | None, None, None]:
        """``prepare`` in units of work (see ``Engine.prepare_steps``): each
        uploaded voice's encoding a part at a time (``encode_in_pieces``: a
        long clip holds the running streams a part's time, not the whole
        clip's), each pause with the part of the encoding done, then the rest."""
        names = self._check_request(request)
        encoded: dict[str, Ints] = {}
        roles = [role for role in REFERENCE_ROLES if role in request.inputs]
        for i, role in enumerate(roles):
            decoded = request.decoded.get(role)
            audio, rate = decoded or self._decode_uploads({role: request.inputs[role]})[role]
            # Each voice's share of the progress: its parts counted beforehand.
            total = parts_of(self.codec) + int(rate != self.sample_rate)
            pieces = self._encode_in_pieces(audio.mean(axis=1), rate)
            share = measured(pieces, total, i / len(roles), 1 / len(roles))
            encoded[role] = yield from without_grad(share)
        with torch.no_grad():
            job = self._prepare(request, names, encoded)
        st: _HiggsJob = job.state
        if st.remade is not None:
            codes, st.remade = st.remade, None
            parts = yield from remake(st.decoder, codes, self._codec_place, self.prefill.seconds)
            if parts:
                st.pending_audio = np.concatenate(parts) if len(parts) > 1 else parts[0]
        yield job

    def _check_request(self, request: EngineRequest) -> list[str]:
        """What needs no model: the text, the voice names, transcripts and their clips.

        Returns the voice names per speaker (empty: none named).
        """
        params = request.params
        self._check_text(request.prompt, "prompt")
        self._check_text(str(params["scene"] or ""), "params.scene")
        for role in REFERENCE_ROLES:
            self._check_text(str(params[f"{role}_text"] or ""), f"params.{role}_text")
        # (A text that comes as it is written may begin empty.)
        if not request.text_stream and not normalize_text(request.prompt):
            raise InvalidField("prompt: the text to speak is empty", field="prompt")
        if not request.text_stream and not normalize_text(SPEAKER_TAG.sub(" ", request.prompt)):
            raise InvalidField(
                "prompt: the text to speak is empty (speaker tags, nothing to say)", field="prompt"
            )
        names = [v.strip() for v in str(params["voice"] or "").split(",")]
        names = names if any(names) else []
        for voice_name in names:
            if voice_name and voice_name not in self.voices:
                listed = list(self.voices)
                known = ", ".join(listed[:20]) + (", …" if len(listed) > 20 else "")
                known = known or "none configured"
                raise InvalidField(
                    f"params.voice: no voice named {voice_name[:64]!r} (voices: {known})",
                    field="params.voice",
                )
        for role in REFERENCE_ROLES:
            if role not in request.inputs and str(params[f"{role}_text"] or "").strip():
                raise InvalidField(
                    f"params.{role}_text is the transcript of inputs.{role}, which was not sent",
                    field=f"params.{role}_text",
                )
        return names

    def _check_text(self, text: str, field: str) -> None:
        """Refuse a text holding one of the model's control tokens: the prompt's
        layout is made of them (a text holding its audio placeholder made the
        request fail; one holding the end of a turn could write the layout)."""
        if found := self._controls.search(text):
            raise InvalidField(
                f"{field}: holds {found.group(0)}, one of the model's control tokens, "
                "which a text cannot hold",
                field=field,
            )

    def _prepare(
        self, request: EngineRequest, names: list[str], encoded: Mapping[str, Ints]
    ) -> Job:
        """A request's job: its voices by name per speaker (``_check_request``),
        its uploaded voices' codes ``encoded`` (by role)."""
        params = request.params
        text = normalize_text(request.prompt)
        # (As numbers, read from their digits: a tag may have more of them than
        # Python makes an int of.)
        numbers = {n.lstrip("0") or "0" for n in SPEAKER_TAG.findall(text)}
        speakers = sorted(numbers, key=lambda n: (len(n), n))
        voices: dict[int, tuple[str | None, Ints]] = {}
        for index, voice_name in enumerate(names):
            if voice_name:
                voice = self.voices[voice_name]
                voices[index] = (voice.transcript, self._voice_codes_of(voice))
        for index, role in enumerate(REFERENCE_ROLES):
            data = request.inputs.get(role)
            if data is not None:
                transcript = str(params[f"{role}_text"] or "").strip() or None
                voices[index] = (transcript, encoded[role])
        scene_value = str(params["scene"] or "")
        scene = scene_text(self.scenes, scene_value) if scene_value.strip() else ""

        system = SYSTEM
        described: list[tuple[str, PromptAudio]] = []
        references: list[tuple[str, PromptAudio]] = []
        multi = len(voices) > 1 or len(speakers) > 1
        if voices:
            if all(transcript is not None for transcript, _ in voices.values()):
                # Each voice as an earlier exchange: its transcript, then its audio.
                for index in sorted(voices):
                    transcript, codes = voices[index]
                    assert transcript is not None
                    said = f"[SPEAKER{index}] {transcript}" if multi else transcript
                    references.append((said, PromptAudio(codes)))
            else:
                # Without transcripts the voices go into the scene description.
                described = [(f"SPEAKER{i}", PromptAudio(voices[i][1])) for i in sorted(voices)]
        elif len(speakers) > 1:
            system = MULTISPEAKER_SYSTEM
            roles = "\n".join(
                f"SPEAKER{n}: {'feminine' if i % 2 == 0 else 'masculine'}"
                for i, n in enumerate(speakers)
            )
            scene = f"{scene}\n\n{roles}" if scene else roles

        chunks, unspoken, text = self._text_chunks(request)
        seed = request_seed(params)
        buffer = params.get("generation_chunk_buffer_size")
        state = _HiggsJob(
            chunks=chunks,
            system=system,
            scene=scene,
            speakers=described,
            references=references,
            history=[],
            buffer_size=None if buffer is None else int(number(buffer)),
            temperature=number(params["temperature"]),
            top_k=int(number(params["top_k"])),
            top_p=number(params["top_p"]),
            max_new_tokens=int(number(params["max_new_tokens"])),
            ras_win_len=int(number(params["ras_win_len"])),
            ras_max_repeat=int(number(params["ras_win_max_num_repeat"])),
            decoder=self.codec_streams.stream(),
            max_frames=self._max_frames,
            text_open=request.text_stream,
            unspoken=unspoken,
        )
        # About 14 characters a second of speech: a rough guide for progress.
        state.expected = max(
            1.0, min(len(text) / 14.0 * self.frame_rate, state.max_new_tokens * len(chunks))
        )
        state.seed = seed
        job = Job(request=request, state=state)
        job.extra["seed"] = seed
        known = self._resume_rows(request, len(chunks))
        if known:
            heard = self._pick_up(state, known, request.resume)
            job.extra["from_codes"] = round(state.produced / self.frame_rate, 6)
            job.extra["from_sample"] = heard * self.hop
        # At most max_new_tokens steps per chunk, a frame each (less the delay);
        # text still to come, the longest request.
        most = min(state.max_frames, state.max_new_tokens * len(chunks))
        if request.text_stream:
            most = state.max_frames
        job.extra["max_seconds"] = round(most / self.frame_rate, 6)
        return job

    def _voice_codes_of(self, voice: Voice) -> Ints:
        return self._voice_codes[voice.name]

    def most_seconds(self, request: EngineRequest) -> float | None:
        """``max_new_tokens`` frames for each chunk of the text, at most the
        longest request (``Engine.most_seconds``), as the job counts them; None
        with an uploaded voice (its encoding)."""
        params = request.params
        if any(role in request.inputs for role in REFERENCE_ROLES):
            return None
        if request.text_stream:
            return self._max_frames / self.frame_rate
        chunks = self._chunks(normalize_text(request.prompt), params)
        most = min(self._max_frames, int(number(params["max_new_tokens"])) * len(chunks))
        return most / self.frame_rate

    @property
    def _max_frames(self) -> int:
        """The frames of the longest request (``--max-duration``)."""
        return max(1, int(self.max_duration * self.frame_rate))

    @staticmethod
    def _chunks(text: str, params: Mapping[str, ParamValue]) -> list[str]:
        """The (normalized) text in the chunks the request asks for."""
        return chunk_text(
            text,
            str(params["chunk_method"]),
            int(number(params["chunk_max_word_num"])),
            int(number(params["chunk_max_num_turns"])),
        )

    def _text_chunks(self, request: EngineRequest) -> tuple[list[str], str, str]:
        """The request's text in the chunks it asks for; the text not spoken yet
        (of a text that comes as it is written); the (normalized) text spoken.
        A text that comes as it is written is spoken as its parts were
        (``add_text``): all of it up to each place a part was flushed
        (``text_flushes``: a stream picked up), then up to its last whole
        sentence, the rest waiting for more."""
        if not request.text_stream:
            text = normalize_text(request.prompt)
            return (self._chunks(text, request.params) if text else []), "", text
        chunks: list[str] = []
        said: list[str] = []
        at = 0
        for end in (*request.text_flushes, None):  # (None: the rest, to its last sentence)
            spoken, unspoken = speakable(request.prompt[at:end], whole=end is not None)
            if text := normalize_text(spoken):
                chunks += self._chunks(text, request.params)
                said.append(text)
            at = end if end is not None else at
        return chunks, unspoken, " ".join(said)

    def check(self, request: EngineRequest) -> dict[str, Upload]:
        self._check_request(request)
        chunks, _, _ = self._text_chunks(request)
        self._resume_codes(request, len(chunks))
        return self._decode_uploads(request.inputs)

    def _resume_rows(self, request: EngineRequest, chunks: int) -> list[list[int]]:
        """``generate.resume_codes`` as the rows ``[K]`` the cut try drew
        (``_resume_codes``)."""
        codes = self._resume_codes(request, chunks)
        rows: list[list[int]] = [] if codes is None else codes.astype(np.int64).tolist()
        return rows

    def _resume_codes(self, request: EngineRequest, chunks: int) -> npt.NDArray[np.uint16] | None:
        """``generate.resume_codes`` as ``[n, K]`` codes: whole rows of ``K``
        codes, each one the model draws (the stream markers among them), no
        more than the request draws at most (``max_new_tokens`` a text chunk);
        else ``InvalidField``."""
        data = request.resume_codes
        if not data:
            return None
        most = int(number(request.params["max_new_tokens"])) * chunks
        return resume_timesteps(
            data, self.num_codebooks, self.decoder.card, most, "the request draws {most} at most"
        )

    def _pick_up(self, st: _HiggsJob, rows: list[list[int]], resume: int) -> int:
        """Pick a stream up from the rows its cut try drew (``generate.resume_codes``).

        They are taken as the steps took them (each chunk's stop rules, its
        frames, the length caps), so that the chunks they complete join the
        history; the chunk under way opens with those it has
        (``Utterance.picked_up``: prefilled, not a step a row), and the
        request's draws count on from their number, so that its rows are those
        of the try that was cut (the same seed). Their frames' audio is made
        again as the job is prepared, but for the frames whose audio the client
        has (``resume`` sample frames): those are the decoder's context only.
        The last row is always drawn: of rows that would end the request, the
        one that ends it is drawn again. Returns the frames heard.
        """
        frames: list[list[int]] = []
        opening = np.array([self.audio_bos_token], dtype=np.int64)
        empty = np.zeros((0, self.num_codebooks), dtype=np.int64)
        u = Utterance.start(opening, empty, self.markers)  # (each chunk's prompt ends so)
        first = 0  # the chunk under way's first row
        for i, row in enumerate(rows):
            all_eos = u.take(row, st.max_new_tokens)
            frame = None if all_eos else u.frame()
            produced = st.produced + (frame is not None)
            ends = u.ended or produced >= st.max_frames
            if ends and (st.index + 1 >= len(st.chunks) or produced >= st.max_frames):
                rows = rows[:i]
                break
            if frame is not None:
                st.chunk_frames.append(frame)
                st.produced = produced
                frames.append(frame)
            if ends:
                self._close_chunk(st)
                st.chunk_frames = []
                u = Utterance.start(opening, empty, self.markers)
                first = i + 1
        st.known = rows[first:] or None
        st.first_draw = st.drawn = len(rows)
        heard = min(resume // self.hop, len(frames))
        if heard:
            st.decoder.prime(frames_to_codes(frames[:heard]))
        if len(frames) > heard:
            st.remade = frames_to_codes(frames[heard:])
        advance_fraction(st, False)
        return heard

    def _decode_uploads(self, inputs: Mapping[str, bytes]) -> dict[str, Upload]:
        from ...audio import decode_upload

        decoded = {}
        for role, data in inputs.items():
            audio, rate = decode_upload(
                data, field=f"inputs.{role}", max_seconds=self.max_upload_seconds
            )
            if audio.shape[0] / rate < 2.0 / self.frame_rate:
                raise InvalidField(
                    f"inputs.{role} is too short to carry a voice", field=f"inputs.{role}"
                )
            decoded[role] = (audio, rate)
        return decoded

    def encode_audio(self, audio: np.ndarray, rate: int) -> Ints:
        """Mono float samples at any rate -> codec codes ``[K, n]`` on the host
        (resampled to the codec's rate as the processor's feature extractor
        expects), in one go."""
        return run_through(without_grad(self._encode_in_pieces(audio, rate)))

    def _encode_in_pieces(self, audio: np.ndarray, rate: int) -> Generator[None, None, Ints]:
        """``encode_audio``, a part at a time (``encode_in_pieces``; the codes come
        to the host at the end)."""
        wav = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
        if rate != self.sample_rate:
            import torchaudio.functional as AF

            wav = AF.resample(wav, rate, self.sample_rate)
            yield
        wav = wav.to(self.device).view(1, 1, -1)
        codes = yield from encode_in_pieces(self.codec, wav)
        host: Ints = codes[0].cpu().numpy().astype(np.int64)
        return host

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        audio: torch.Tensor = self.codec.decode(codes.to(self.device)).audio_values
        return audio

    # -- one chunk -----------------------------------------------------------------

    def chunk_prompt(self, st: _HiggsJob) -> list[PromptPart]:
        """The prompt of a request's current text chunk: the system, scene and
        voices, the chunks spoken so far (as many as it keeps), and the chunk."""
        history = st.history
        if st.buffer_size is not None:
            history = history[-st.buffer_size :]
        return build_prompt(
            st.system, st.scene, st.speakers, st.references + history, st.chunks[st.index]
        )

    def _chunk_tokens(self, st: _HiggsJob) -> tuple[Ints, Ints]:
        """``tokens(chunk_prompt(st))``. The prompt's beginning, up to the chunks
        spoken so far, is tokenized once and grown a chunk at a time, so that a
        chunk opens at the cost of its own text and audio, not of the whole
        conversation before it (2,000 short sentences, a sentence a chunk, took
        minutes so, every stream's step held at each). Where the tokenizer does
        not split at turns (``_splits_at_turns``), or the request's window of
        chunks kept (``generation_chunk_buffer_size``) has begun to move, the
        prompt is tokenized whole."""
        kept = len(st.history)
        if not self._grows_prompts or (st.buffer_size is not None and kept > st.buffer_size):
            return self.tokens(self.chunk_prompt(st))
        if st.head is None:
            ids, audio = self.tokens(
                build_preamble(st.system, st.scene, st.speakers, st.references + st.history)
            )
            st.head = (ids, audio, kept)
        elif st.head[2] < kept:
            ids, audio = self.tokens(turn_parts(st.history[st.head[2] :]))
            st.head = (np.concatenate([st.head[0], ids]), np.concatenate([st.head[1], audio]), kept)
        ids, audio = self.tokens([user_turn(st.chunks[st.index])])
        return np.concatenate([st.head[0], ids]), np.concatenate([st.head[1], audio])

    def _splits_at_turns(self) -> bool:
        """Whether this tokenizer gives a prompt the tokens of its beginning, its
        turns and its last part tokenized apart (each begins and ends at a
        special token, where a tokenizer splits the text, unless its own rules
        join across them). Tried at load on a prompt of two turns whose texts
        hold what such rules would join: punctuation, a paragraph's break,
        spaces at their ends."""
        audio = PromptAudio(np.zeros((self.num_codebooks, 2), dtype=np.int64))
        turns = [("Hello there.", audio), ("And again,\n\n it's me!", audio)]
        whole = self.tokens(build_prompt(SYSTEM, "a quiet room", [], turns, " Bye. "))
        pieces = [
            self.tokens(build_preamble(SYSTEM, "a quiet room", [], turns[:1])),
            self.tokens(turn_parts(turns[1:])),
            self.tokens([user_turn(" Bye. ")]),
        ]
        grown = (np.concatenate([p[i] for p in pieces]) for i in (0, 1))
        return all(np.array_equal(a, b) for a, b in zip(whole, grown, strict=True))

    def tokenize(self, parts: Sequence[PromptPart]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A prompt's tokens ``[1, L]`` and audio rows ``[1, N, K]`` (None: no
        audio), on the device (``tokens``' on the host)."""
        ids, audio = self.tokens(parts)
        input_ids = torch.from_numpy(ids).to(self.device)[None]
        audio_ids = torch.from_numpy(audio).to(self.device)[None] if len(audio) else None
        return input_ids, audio_ids

    def tokens(self, parts: Sequence[PromptPart]) -> tuple[Ints, Ints]:
        """A prompt's tokens ``[L]`` and audio rows ``[N, K]`` (``N`` may be 0), on
        the host.

        Each audio block stands in the text as ``<|AUDIO_OUT|>`` once a row (and
        the delay token once a trailing row); the placeholders are special
        tokens, which the tokenizer splits the text at, so the text is tokenized
        with one placeholder a block and the ids are widened after: the same
        ids, without tokenizing hundreds of placeholders a voice (a text that
        holds the placeholder itself is tokenized as laid out)."""
        texts: list[str] = []
        blocks: list[Ints] = []
        k = self.num_codebooks
        for part in parts:
            if isinstance(part, PromptAudio):
                blocks.append(delay_block(part.codes, self.stream_bos, self.stream_eos))
                texts.append(AUDIO_OUT)
            else:
                texts.append(part)
        ids = self._token_ids("".join(texts))
        marks = np.flatnonzero(ids == self.audio_token)
        if len(marks) == len(blocks):
            pieces: list[Ints] = []
            last = 0
            for at, block in zip(marks.tolist(), blocks, strict=True):
                rows = int(block.shape[0])
                pieces += [ids[last:at], np.full(rows - (k - 1), self.audio_token, np.int64)]
                pieces.append(np.full(k - 1, self.delay_token, np.int64))
                last = at + 1
            pieces.append(ids[last:])
            ids = np.concatenate(pieces)
        else:
            laid_out = iter(blocks)
            texts = [
                AUDIO_OUT * (int(next(laid_out).shape[0]) - (k - 1)) + AUDIO_DELAY * (k - 1)
                if isinstance(part, PromptAudio)
                else part
                for part in parts
            ]
            ids = self._token_ids("".join(texts))
        audio = np.concatenate(blocks) if blocks else np.zeros((0, k), dtype=np.int64)
        return ids, audio

    def _token_ids(self, text: str) -> Ints:
        encoded = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return np.asarray(encoded, dtype=np.int64)

    # -- stepping ------------------------------------------------------------------

    def begin(self, jobs: Sequence[Job]) -> None:
        """What of the requests' first step need not wait for it (``Engine.begin``,
        ``_open``): their rows taken and their first chunks' prompts opened. The
        prefill is the step's, for every request starting in it at once. A
        request that fails here fails in that step."""
        failures: dict[int, BaseException] = {}
        states = [job.state for job in jobs]
        try:
            with torch.no_grad():
                self._open(states, failures)
        except Exception as exc:  # (a part for every request: each fails with it)
            for st in states:
                failures.setdefault(id(st), exc)
        for st in states:
            st.failed = failures.get(id(st))

    def _open(self, states: Sequence[_HiggsJob], failures: dict[int, BaseException]) -> None:
        """Rows taken for the requests that have none (their sampling written in
        one call), and the next chunk's prompt opened for those between chunks
        (its rules set); those that fail on their own go into ``failures``."""
        states = [st for st in states if id(st) not in failures]
        joining = [st for st in states if st.slot is None]
        for st in joining:
            attempt(failures, [st], self._take_slot, st)
        taken = [st for st in joining if id(st) not in failures]
        attempt_together(failures, taken, self._write_sampling)
        opened: list[tuple[int, Ints]] = []  # rows whose utterance opens: their rules
        for st in states:
            if st.index >= len(st.chunks):
                continue  # (its text has not come yet)
            if st.utterance is None and id(st) not in failures:
                if st.paused:
                    self._continued(st)
                u = st.utterance = attempt(failures, [st], self._open_utterance, st)
                st.spoken = None
                if u is None or not u.known:
                    st.chunk_frames = []
                if u is not None and st.slot is not None:
                    opened.append((st.slot, self._rules.initial(u)))
        self._rules.reset(opened)

    def step(self, jobs: Sequence[Job]) -> list[StepOutput]:
        """One decoder forward for every request (after prefilling what is due), one
        draw per row, one copy each way; then each request's frames and audio. A
        request whose streamed text ended with all of it spoken ends."""
        if any(_spent(job.state) for job in jobs):
            live = [job for job in jobs if not _spent(job.state)]
            stepped = dict(zip(map(id, live), self.step(live), strict=True))
            return [stepped.get(id(job)) or self._end_spent(job) for job in jobs]
        with torch.no_grad():
            return self._step(jobs)

    def _end_spent(self, job: Job) -> StepOutput:
        """A request whose streamed text ended once it had spoken all of it: its
        audio went out as it paused (``_advance``)."""
        st: _HiggsJob = job.state
        self._release_slot(st)
        advance_fraction(st, True)
        return StepOutput(
            audio=None, fraction=st.fraction, seconds=st.produced / self.frame_rate, done=True
        )

    def add_text(self, job: Job, text: str, *, flush: bool, end: bool) -> None:
        st: _HiggsJob = job.state
        if not st.text_open:
            raise InvalidField("the request's text has ended", field="text")
        unspoken = st.unspoken + text
        self._check_text(unspoken, "text")
        st.text_open = not end
        whole, st.unspoken = speakable(unspoken, whole=flush or end)
        said = normalize_text(whole)
        if said:
            st.chunks.extend(self._chunks(said, job.request.params))

    def waiting(self, job: Job) -> bool:
        st: _HiggsJob = job.state
        # (Not while a pipelined step's output read while it sat out is its to give.)
        return st.text_open and st.index >= len(st.chunks) and st.utterance is None and not st.held

    def _continued(self, st: _HiggsJob) -> None:
        """A codec stream for the speech after a pause for text, primed with the
        frames before it (the codec's context: none of their audio again)."""
        decoder = self.codec_streams.stream()
        spoken: list[Ints] = []  # (the last chunks', as many frames as it keeps)
        for _, audio in reversed(st.history):
            if sum(codes.shape[1] for codes in spoken) >= decoder.left_context:
                break
            spoken.insert(0, audio.codes)
        if spoken:
            decoder.prime(np.concatenate(spoken, axis=1)[None])
        st.decoder, st.paused = decoder, False

    def _step(self, jobs: Sequence[Job]) -> list[StepOutput]:
        if self.pipelined:
            return self._step_pipelined(jobs)
        failures: dict[int, BaseException] = {}
        launched = self._launch(jobs, failures)
        outputs: dict[int, StepOutput] = {}
        self.codec_streams.tick()
        if launched is not None:
            self._read(launched, failures, outputs)
        self._decode_due()
        return [self._output(job, failures, outputs) for job in jobs]

    def _step_pipelined(self, jobs: Sequence[Job]) -> list[StepOutput]:
        """``step`` with the device computing while the host works: this step is
        launched first (each row feeds the codes it drew last and draws by its
        rules, all on the device: ``RowRules``), then the last step's codes are
        read and each request's row taken (its frames, its stop rules), then its
        audio decoded (the codec on a CUDA stream of its own) and the outputs
        returned while the device computes. Each step's outputs come a call
        later.

        A row whose utterance ends by its length in the step being read sits
        this step out (the next chunk's prompt is made of what it spoke). One
        that ends by its codes (every codebook at stream EOS) drew once more in
        the step launched: that draw is dropped and what it counted undone (the
        row's draw counter, its rows fed back), so that every request draws
        what the plain steps draw, from the same logits."""
        before, self._in_flight = self._in_flight, None
        failures: dict[int, BaseException] = {}
        outputs: dict[int, StepOutput] = {}
        self.codec_streams.tick()
        drawing = set() if before is None else {id(st) for st, _ in before.current(self._slots)}
        going = [
            job
            for job in jobs
            if not (id(job.state) in drawing and self._ends_by_length(job.state))
        ]
        launched = self._in_flight = self._launch(going, failures, later=True)
        if before is not None:
            self._read(before, failures, outputs)
            # (The scheduler leaves no decoding request out of a step; should one
            # be, its output waits for its next.)
            present = {id(job.state) for job in jobs}
            for st, job in before.drew:
                if job is not None and id(st) not in present and id(st) in outputs:
                    st.held = outputs.pop(id(st))
        if launched is not None:
            self._drop_ended(launched, failures)
        self._decode_due()
        return [self._output(job, failures, outputs) for job in jobs]

    def _ends_by_length(self, st: _HiggsJob) -> bool:
        """Whether the row a request drew in the step in flight ends its
        utterance by the length caps (``max_new_tokens``, the request's frames),
        whatever its codes."""
        u = st.utterance
        if u is None:
            return False
        frame = u.generated >= self.num_codebooks  # (the row completes a frame)
        return u.steps + 1 >= st.max_new_tokens or st.produced + frame >= st.max_frames

    def _drop_ended(
        self, launched: Launched[_HiggsJob], failures: dict[int, BaseException]
    ) -> None:
        """Drop from a step launched before the last one was read the draws of
        the requests that failed in that one or whose utterance it ended (by
        their codes), undoing what the draw counted for those going on to their
        next chunk; nothing in flight where no draw is left."""
        for st, _ in list(launched.drew):
            if id(st) not in failures and st.utterance is not None:
                continue
            launched.forget(st)
            if id(st) not in failures and st.slot is not None and st.spoken is not None:
                self._sampling.step[st.slot] -= 1
                st.spoken.forwarded -= 1
        if not launched.drew:
            self._in_flight = None

    def _output(
        self, job: Job, failures: dict[int, BaseException], outputs: dict[int, StepOutput]
    ) -> StepOutput:
        """A request's output of a step: its failure, its row read, what a step
        read while it was left out, or nothing new (its prompt going in)."""
        st: _HiggsJob = job.state
        if id(st) in failures:
            self._clear_row(st)
            return failed_output(job, failures[id(st)])
        if id(st) in outputs:
            return self._with_pending(st, outputs[id(st)])
        if st.held is not None:
            held, st.held = st.held, None
            output = held
        else:
            output = StepOutput(
                audio=None, fraction=st.fraction, seconds=st.produced / self.frame_rate
            )
        return self._with_pending(st, output)

    @staticmethod
    def _with_pending(st: _HiggsJob, output: StepOutput) -> StepOutput:
        """A picked-up request's first output, its known frames' audio first."""
        if st.pending_audio is not None:
            pending, st.pending_audio = st.pending_audio, None
            audio = output.audio
            output.audio = pending if audio is None else np.concatenate([pending, audio])
        return output

    def _read(
        self,
        launched: Launched[_HiggsJob],
        failures: dict[int, BaseException],
        outputs: dict[int, StepOutput],
    ) -> None:
        """A launched step's codes on the host (waiting for them): each request
        that drew has its row's rules kept and its frames and audio planned
        (``_advance``), or fails (non-finite logits)."""
        rows = launched.rows()
        drew = [(st, job) for st, job in launched.current(self._slots) if job is not None]
        for st, _ in drew:
            assert st.slot is not None
            if not rows[st.slot][-1]:
                failures[id(st)] = non_finite()
        if self.logits_observer is not None:
            self.logits_observer(
                {
                    job.request.request_id: launched.logits[st.slot]
                    for st, job in drew
                    if id(st) not in failures and st.slot is not None
                }
            )
        for st, job in drew:
            if id(st) not in failures:
                assert st.slot is not None
                outputs[id(st)] = isolated(job, self._advance, job, rows[st.slot][:-1])

    def _launch(
        self, jobs: Sequence[Job], failures: dict[int, BaseException], later: bool = False
    ) -> Launched[_HiggsJob] | None:
        """One decoder forward for every request (after prefilling what is due),
        one draw per row, one copy each way, launched (None: no request left).
        Requests that fail on their own go into ``failures`` (by ``id`` of their
        state). ``later``: the codes are read back later (``Launched.wait``)."""
        states = [job.state for job in jobs]
        for st in states:  # (what failed in ``begin``, failed now)
            if st.failed is not None:
                failures[id(st)], st.failed = st.failed, None
        self._open(states, failures)
        # (one whose text has not come yet has no utterance: nothing to step)
        states = [st for st in states if id(st) not in failures and st.utterance is not None]
        prefilled = self._prefill_due(states, failures)
        states = [st for st in states if id(st) not in failures]
        decoder = self.decoder
        if not states:
            return None
        k = self.num_codebooks
        rows = self._slots.span(st.slot for st in states if st.slot is not None)
        window = max(1, *self._ras_len[:rows].tolist())  # (numpy's max: microseconds)
        if self._graphs is not None:
            window = span_for(window, least=8)  # a few shapes (the rest is -1: no repeat)
        stepped = np.zeros(rows, dtype=bool)
        active = np.zeros(rows, dtype=np.int64)
        decoding: list[_HiggsJob] = []
        for st in states:
            u, slot = st.utterance, st.slot
            assert u is not None and slot is not None
            if u.fed < len(u.ids):
                continue  # its prompt is still going in
            if slot not in prefilled:
                active[slot] = 1  # it feeds the row it drew last
                decoding.append(st)
            stepped[slot] = True
        sampling = self._sampling
        draw_keys, redraw_keys = sampling.draw_and_redraw_keys(rows, k)
        overrides = np.zeros(rows, dtype=np.int64)  # rows whose logits come from their prefill
        host = np.concatenate(
            [
                active,
                stepped,
                draw_keys.reshape(-1),
                redraw_keys.reshape(-1),
                self._ras_max[:rows],
                self._ras_len[:rows],
                overrides,
            ]
        )
        # Attend over the longest row's positions, rounded up to a power of two.
        span = span_for(max((self._row_length(st) for st in decoding), default=0) + 2)
        if self._graphs is not None and decoding:
            for slot, row_logits in prefilled.items():
                self._prefilled.logits[slot] = row_logits.float()
                host[-rows + slot] = 1
            inputs = to_device(torch.from_numpy(host), self.device, later)
            back_device, logits = self._graphs((rows, span, window), inputs)
        else:
            inputs = to_device(torch.from_numpy(host), self.device, later)
            parts = self._parts(inputs, rows)
            if decoding:
                logits = decoder.decode(self._rules.fed(rows), parts[0].bool(), span).float()
            else:
                logits = torch.zeros(rows, k, decoder.card, device=self.device)
            for slot, row_logits in prefilled.items():
                logits[slot] = row_logits.float()
            back_device = self._draw(logits, parts, rows, window)
        for st in decoding:
            assert st.utterance is not None
            st.utterance.forwarded += 1
        sampling.step[:rows] += stepped
        # One copy back: the codes, and whether each row's logits were finite.
        back, ready = read_back(back_device, later)
        by_state = {id(job.state): job for job in jobs}
        drew: list[tuple[_HiggsJob, Job | None]] = [
            (st, by_state[id(st)])
            for st in states
            if st.slot is not None and st.slot < rows and stepped[st.slot]
        ]
        return Launched(back, ready, logits, stepped, drew)

    def _parts(self, inputs: torch.Tensor, rows: int) -> list[torch.Tensor]:
        """A step's inputs from their one copy: which rows feed the row they drew
        last ``[R]``, which rows draw ``[R]``, keys and redraw keys ``[R, K]``
        (``codebook_keys``), RAS repeats ``[R]`` and windows ``[R]``, and which
        rows' logits come from their prefill ``[R]``. (The codes fed, the
        delay pattern's and the repetition windows are the rows' rules, on the
        device: ``RowRules``.)"""
        k = self.num_codebooks
        cut = self._cuts.get(rows)
        if cut is None:
            cut = self._cuts[rows] = np.cumsum(self._input_sizes(rows)[:-1]).tolist()
        parts = list(torch.tensor_split(inputs, cut))
        parts[2] = parts[2].view(rows, k)
        parts[3] = parts[3].view(rows, k)
        return parts

    def _input_sizes(self, rows: int) -> list[int]:
        """The sizes of ``_parts``, in order."""
        k = self.num_codebooks
        return [rows, rows, rows * k, rows * k, rows, rows, rows]

    def _draw(
        self, logits: torch.Tensor, parts: list[torch.Tensor], rows: int, window: int
    ) -> torch.Tensor:
        """Every row's codes by its rules (the delay pattern's forced codes,
        temperature, top-k, top-p, repetition-aware redraws), kept in its rules
        (``RowRules.take``), and whether its logits were finite: ``[R, K + 1]``."""
        warpers = self._sampling.warpers
        assert warpers is not None
        forced, recent = self._rules.forced(rows, parts[5], window)
        tokens = sample_repeat_aware(
            logits, forced, warpers.head(rows), parts[2], recent, parts[4], parts[3]
        )
        self._rules.take(rows, parts[1].bool(), tokens)
        finite = finite_rows(logits)
        return torch.cat([tokens, finite[:, None].to(tokens.dtype)], 1)

    def _graphed_step(
        self, inputs: Sequence[torch.Tensor], key: Key
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The device side of a step, as one graph: the forward of every row, the
        prefilled rows' logits in place of theirs, and every row's draw by its
        rules. ``[R, K + 1]`` and the logits."""
        rows, span, window = key
        parts = self._parts(inputs[0], rows)
        logits = self.decoder.decode(self._rules.fed(rows), parts[0].bool(), span).float()
        logits = self._prefilled.merge(logits, parts[6])
        return self._draw(logits, parts, rows, window), logits

    @staticmethod
    def _row_length(st: _HiggsJob) -> int:
        """Positions in the request's row: its prompt, and the rows fed back."""
        assert st.utterance is not None
        return len(st.utterance.ids) + st.utterance.forwarded

    def _grow(self, slots: int) -> int:
        """Room for ``slots`` requests (a row each); how many there is now."""
        old = len(self._ras_len)
        self.decoder.ensure(rows=slots)
        count = self.decoder.rows
        if count > old:
            self._sampling = self._sampling.grown(count)
            self._ras_len = np.concatenate([self._ras_len, np.zeros(count - old, dtype=np.int64)])
            self._ras_max = np.concatenate([self._ras_max, np.ones(count - old, dtype=np.int64)])
            self._prefilled.grow(count)
            self._rules.grow(count)
        return count

    def _take_slot(self, st: _HiggsJob) -> None:
        slot = st.slot = self._slots.take(st)
        self._ras_len[slot] = st.ras_win_len
        self._ras_max[slot] = st.ras_max_repeat

    def _write_sampling(self, states: list[_HiggsJob]) -> None:
        """The sampling parameters of requests taking their rows this step, in one
        write (a picked-up request's draws counted from those made before)."""
        slots = [st.slot for st in states if st.slot is not None]
        self._sampling.set_requests(slots, states, [st.first_draw for st in states])

    def _clear_row(self, st: _HiggsJob) -> None:
        """Zero a failed request's cache row: what it left there (NaN, say) must not
        reach the slot's next request through a masked position."""
        if st.slot is not None and self._slots.holds(st, st.slot):
            self.decoder.kv.clear([st.slot])

    def _release_slot(self, st: _HiggsJob) -> None:
        if st.slot is not None and self._slots.release(st, st.slot):
            self._ras_len[st.slot] = 0
        st.slot = None

    def _open_utterance(self, st: _HiggsJob) -> Utterance:
        """The next chunk's prompt, set up in the request's row: the part its cache
        already holds (the last chunk's prompt and answer, where the new prompt
        repeats them) is kept, the rest is prefilled."""
        ids, audio = self._chunk_tokens(st)
        u = Utterance.start(ids, audio, self.markers)
        if st.known is not None:
            u, st.known = u.picked_up(st.known), None
        if st.spoken is not None:
            u.fed = u.reusable(st.spoken)
        self.decoder.ensure(length=len(ids) + st.max_new_tokens + 1)
        st.sharing = self._shared_beginning(st, u) if u.fed == 0 and self.prefixes.budget else None
        return u

    def _shared_beginning(self, st: _HiggsJob, u: Utterance) -> tuple[bytes, int] | None:
        """What the prompt opens with that other requests may share (the system
        text, scene and reference voices, laid out and tokenized alone): its
        content and length, or None where the prompt does not open with it as
        tokenized alone, or is no longer."""
        parts = build_preamble(st.system, st.scene, st.speakers, st.references)
        content = tuple(part if isinstance(part, str) else part.codes.tobytes() for part in parts)
        tokens = self._preambles.pop(content, None)
        if tokens is None:
            tokens = self.tokens(parts)
            if len(self._preambles) >= self.PREAMBLES:
                self._preambles.pop(next(iter(self._preambles)))
        self._preambles[content] = tokens  # (the most recently used last)
        ids, audio = tokens
        length, rows = len(ids), len(audio)
        if length >= len(u.ids) or not np.array_equal(u.ids[:length], ids):
            return None
        if not np.array_equal(u.audio[:rows], audio):
            return None
        return ids.tobytes() + audio.tobytes(), length

    def _prefill_due(
        self, states: list[_HiggsJob], failures: dict[int, BaseException]
    ) -> dict[int, torch.Tensor]:
        """Feed the next chunk of each prompt not yet in the cache, oldest first,
        in one call (prompts of different lengths and places, packed).

        At most ``prefill_chunk`` positions per request, and the step's budget in
        all (``prefill``: ``choose`` says which chunks fit it). A prompt opening
        with a kept beginning (``PrefixStore``) gets it copied into its row and
        feeds the rest. Requests of a step opening with the same beginning, not
        kept: the oldest feeds it, and the others, in the call where the
        oldest's chunk reaches the beginning's end, only what follows it, the
        beginning copied from the oldest's row layer by layer (until then they
        wait). Returns the logits ``[K, card]`` of each slot whose prompt
        is now complete: it samples in this step. A request whose chunk fails
        alone goes into ``failures`` (``feed``).
        """
        waiting = []
        owners: dict[bytes, _HiggsJob] = {}  # who feeds a beginning from its start
        followers: dict[int, _HiggsJob] = {}  # by id: whose beginning a request copies
        for st in states:
            u = st.utterance
            assert u is not None and st.slot is not None
            if u.fed >= len(u.ids):
                continue
            if st.sharing is not None:
                key, length = st.sharing
                held = self.prefixes.get(key) if u.fed == 0 else None
                if held is not None:
                    self.decoder.hold(st.slot, *held)
                    u.fed = length
                    st.sharing = None
                elif key not in owners or u.fed:
                    owners.setdefault(key, st)
                elif _reach(owners[key], self.prefill_chunk) < length:
                    continue  # copied once kept
                else:
                    followers[id(st)] = owners[key]
                    waiting.append((st, min(len(u.ids) - length, self.prefill_chunk)))
                    continue
            waiting.append((st, min(len(u.ids) - u.fed, self.prefill_chunk)))
        complete: dict[int, torch.Tensor] = {}
        if not waiting:
            return complete
        chosen, _ = choose(waiting, self.prefill.now())
        # A request copying a beginning goes in beside the one feeding all of it.
        reach = {id(st): st.utterance.fed + size for st, size in chosen if st.utterance}
        chosen = [
            (st, size)
            for st, size in chosen
            if id(st) not in followers or reach.get(id(followers[id(st)]), 0) >= _shared(st)
        ]
        for st, _ in chosen:
            if id(st) in followers:
                assert st.utterance is not None
                st.utterance.fed = _shared(st)
        width = max(size for _, size in chosen)

        def call(chunks: list[tuple[_HiggsJob, int]], width: int) -> torch.Tensor:
            return self._prefill_call(chunks, followers)

        logits = feed(chosen, width, call, failures, self.prefill)
        for (st, size), row_logits in zip(chosen, logits, strict=True):
            u = st.utterance
            assert u is not None and st.slot is not None
            if row_logits is None:
                continue
            u.fed += size
            if st.sharing is not None and u.fed >= st.sharing[1]:
                if id(st) not in followers:
                    key, length = st.sharing
                    self.prefixes.put(key, *self.decoder.held(st.slot, length))
                st.sharing = None
            if u.fed == len(u.ids):
                complete[st.slot] = row_logits
        return complete

    def _prefill_call(
        self, chosen: list[tuple[_HiggsJob, int]], followers: Mapping[int, _HiggsJob]
    ) -> torch.Tensor:
        """One prefill call: each request's next ``size`` positions (a request
        copying a beginning from a row in the call: what follows it; from none,
        as when fed alone after the call failed: the beginning too), packed;
        the logits ``[R, K, card]`` of each one's last position."""
        spans = []
        copies: dict[tuple[int, int], list[int]] = {}  # (row, positions) -> rows copying them
        present = {id(st) for st, _ in chosen}
        for st, size in chosen:
            u = st.utterance
            assert u is not None and st.slot is not None
            start = u.fed
            owner = followers.get(id(st))
            if owner is not None:
                if id(owner) in present:
                    assert owner.slot is not None
                    copies.setdefault((owner.slot, start), []).append(st.slot)
                else:
                    start = 0
            spans.append((start, u.fed + size))
        width = max(end - start for start, end in spans)
        count = len(chosen)
        ids = np.zeros((count, width), dtype=np.int64)
        is_audio = np.zeros((count, width), dtype=bool)
        audio_parts = []
        for i, ((st, _), (start, end)) in enumerate(zip(chosen, spans, strict=True)):
            u = st.utterance
            assert u is not None
            first = int(u.is_audio[:start].sum())
            audio_parts.append(u.audio[first : first + int(u.is_audio[start:end].sum())])
            ids[i, : end - start] = u.ids[start:end]
            is_audio[i, : end - start] = u.is_audio[start:end]
        audio = np.concatenate(audio_parts)
        rows = [st.slot for st, _ in chosen if st.slot is not None]
        starts = [start for start, _ in spans]
        sizes = [end - start for start, end in spans]
        shared = [(row, targets, length) for (row, length), targets in copies.items()]
        return self.decoder.prefill(rows, ids, audio, is_audio, starts, sizes, shared)

    def _advance(self, job: Job, tokens: list[int]) -> StepOutput:
        """A request's sampled row ``[K]``: its utterance's rules, frames and audio."""
        st: _HiggsJob = job.state
        u = st.utterance
        assert u is not None
        job.steps += 1
        all_eos = u.take(tokens, st.max_new_tokens)
        plan = None
        frame = None if all_eos else u.frame()
        caption = None
        if frame is not None:
            if not st.chunk_frames:  # (the chunk's first frame: its audio begins here)
                caption = (st.produced * self.hop, st.chunks[st.index].strip())
            st.chunk_frames.append(frame)
            st.produced += 1
            plan = st.decoder.plan_push_frame(frame)
        done = False
        pause = False
        if u.ended or st.produced >= st.max_frames:
            st.spoken = u
            st.utterance = None
            if self._close_chunk(st):
                done = True
                # The rest of the stream, in the step's codec calls (streams that
                # end together, with the same frames left, in one).
                plan = st.decoder.plan_flush()
                self._release_slot(st)
            elif st.index >= len(st.chunks):
                # All of its text so far spoken, more to come: its audio goes
                # out whole, as if it ended here, and the next chunk's goes on
                # from it (``_continued``); its row waits, kept.
                pause = st.paused = True
                plan = st.decoder.plan_flush()
        advance_fraction(st, done)
        output = StepOutput(
            audio=None,
            fraction=st.fraction,
            seconds=st.produced / self.frame_rate,
            done=done,
            waiting=pause,
            caption=caption,
        )
        output.codes, output.codes_from = [tokens], st.drawn
        st.drawn += 1
        if plan is not None:
            (self._ends if done or pause else self._due).append((output, st.decoder, plan))
        return output

    def _close_chunk(self, st: _HiggsJob) -> bool:
        """A text chunk is spoken (both paths): its audio becomes context for the
        next chunks. Whether the request is done (no chunk left, or the length cap)."""
        spoken = st.chunks[st.index]
        if st.chunk_frames:
            st.history.append((spoken, PromptAudio(self._chunk_codes(st))))
        st.index += 1
        return (st.index >= len(st.chunks) and not st.text_open) or st.produced >= st.max_frames

    def _chunk_codes(self, st: _HiggsJob) -> Ints:
        """``[K, frames]``: the frames of the chunk being spoken, on the host."""
        codes: Ints = frames_to_codes(st.chunk_frames)[0]
        return codes

    def _decode_due(self) -> None:
        """Decode every stream's due codec window, batched (calls of at most
        ``codec_batch``), then the ends of the streams that ended. (First chunks
        due a step before others' wait for them: ``wait_for_firsts``.)"""
        if self._due:
            due, self._due = self.codec_streams.due_now(self._due), []
            began = time.perf_counter()
            with self._codec_place():
                complete_due(self._decode, due, self.codec_batch)
            self.codec_seconds += time.perf_counter() - began
        if self._ends:
            ends, self._ends = self._ends, []
            with self._codec_place():
                complete_due(self._decode, ends, self.codec_batch)

    def _warm_up_request(self) -> tuple[str, dict[str, ParamValue]]:
        return ("Hello.", {"max_new_tokens": 8, "seed": 0})

    def _codec_context(self) -> contextlib.AbstractContextManager[Any]:
        return self._codec_place()

    def _table_length(self) -> int:
        """A row's positions as the table is reserved for: 1024 prompt positions
        and the default ``max_new_tokens``."""
        default = next(spec.default for spec in self._params if spec.name == "max_new_tokens")
        assert isinstance(default, int)
        return 1024 + default + 1

    def _measured(self) -> list[torch.nn.Module]:
        return [self.model, self.codec]

    def _check_room(self, step: float) -> None:
        """Refuse to serve ``max_active`` requests whose table the memory cannot hold
        (reserved now with graphs, grown on demand without: refused either way);
        where none were asked for, as many as fit (``room_for``), up to what one
        stream's ``step`` (its time at warm-up) leaves (``auto_most``)."""
        length = self._table_length()
        decoder = self.decoder
        self.max_active = room_for(
            self.name,
            lambda n: decoder.bytes_for(rows=n, length=length),
            self._asked_active,
            self.device,
            self.memory_share,
            auto_most(self.device, step, self.frame_rate),
        )

    def _prepare_graphs(self) -> None:
        """Every shape of the decode step that ``max_active`` requests can take,
        ready now (on CUDA, recorded before the server reports ready, so that no
        stream waits on a recording later): the table's rows for them, each with
        room for 1024 prompt positions and the default ``max_new_tokens`` (a
        longer row grows the cache: the graphs are recorded again as their shapes
        come back)."""
        assert self._graphs is not None
        self._slots.reserve(self.max_active)
        self.decoder.ensure(length=self._table_length())
        rows = self._slots.spans()
        spans = powers_of_two(64, self.decoder.length)
        # The default repetition-aware window's shape (others are recorded on first use).
        ras = next(spec.default for spec in self._params if spec.name == "ras_win_len")
        assert isinstance(ras, int)
        window = span_for(max(1, ras), least=8)

        def blank(key: Key) -> list[torch.Tensor]:
            size = sum(self._input_sizes(key[0]))
            return [torch.zeros(size, dtype=torch.int64, device=self.device)]

        keys = [(r, s, window) for r in rows for s in spans]
        label = f"{self.name} ({rows[-1]} rows at most, {self.decoder.length} positions)"
        with torch.no_grad():
            self._graphs.prepare(keys, blank, label=label)

    def finish(self, job: Job) -> None:
        st = job.state
        if st is not None:
            self._release_slot(st)
            if self._in_flight is not None:  # (its codes in flight go unread)
                self._in_flight.forget(st)
        job.state = None

    def _under_way(self, st: _HiggsJob) -> bool:
        """Whether a chunk is being spoken (its frames are not in the history yet)."""
        return st.utterance is not None

    # -- for tests and benchmarks ----------------------------------------------------

    def codes_of(self, job: Job) -> torch.Tensor:
        """Every frame ``[1, K, T]`` the job has streamed so far."""
        st: _HiggsJob = job.state
        spoken = [audio.codes for _, audio in st.history]
        if self._under_way(st) and st.chunk_frames:  # a chunk under way
            spoken.append(self._chunk_codes(st))
        return torch.from_numpy(np.concatenate(spoken, axis=-1))[None].to(self.device)


def _reach(st: _HiggsJob, chunk: int) -> int:
    """How far into its prompt a request's next prefill call feeds at most."""
    u = st.utterance
    assert u is not None
    return u.fed + min(len(u.ids) - u.fed, chunk)


def _shared(st: _HiggsJob) -> int:
    """The positions of a request's shared beginning."""
    assert st.sharing is not None
    return st.sharing[1]


def _spent(st: _HiggsJob) -> bool:
    """Whether a request's streamed text ended with all of it spoken (its codec
    stream ended as it waited: ``_advance``)."""
    return not st.text_open and st.index >= len(st.chunks) and st.utterance is None


def advance_fraction(st: _HiggsJob, done: bool) -> None:
    """A request's progress: chunks spoken, and within the chunk the frames made
    against a rough guess of the text's length; never backwards, 1 when done."""
    if done:
        st.fraction = 1.0
        return
    if st.text_open:
        return  # (how much is to come is not known)
    base = st.index / len(st.chunks)
    within = min(0.95, st.produced / st.expected)
    st.fraction = max(st.fraction, min(0.999, max(base, within)))
