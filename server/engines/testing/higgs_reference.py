"""HiggsAudio v2 stepped request by request through transformers' own forward.

The reference the batched engine (``engines.higgs.engine``) is tested against: each
request alone, with its own ``DynamicCache``, transformers' logits processors
and warpers (the delay pattern, temperature, top-k, top-p) and
``torch.multinomial`` with the request's own torch generator, as ``generate``
draws. Its codes equal ``generate``'s, greedy and sampled (repetition-aware
sampling and natural EOS included); the batched engine's equal its codes when
greedy (its counter-based noise cannot reproduce a torch generator's draws).
The prompt, chunking, voices, stream decoding and progress are the engine's own.

Tests and benchmarks only (``bench/bench_engine.py --reference``): the server
never serves it, and the engines never import it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache, LogitsProcessorList
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.models.higgs_audio_v2.generation_higgs_audio_v2 import (
    HiggsAudioV2DelayPatternLogitsProcessor,
)

from ..base import FloatAudio, Job, StepOutput
from ..higgs.engine import HiggsEngine, advance_fraction
from ..higgs.prompt import PromptPart
from ..higgs.utterance import MAX_RAS_WINDOW

__all__ = ["HiggsReference", "HiggsStream"]


@dataclass(slots=True)
class HiggsStream:
    """Sampling state for one utterance (one chunk): mirrors ``generate``'s loop."""

    processors: LogitsProcessorList
    cache: DynamicCache
    input_ids: torch.Tensor  # [1, L] text tokens (only the tail matters once prefilled)
    audio_ids: torch.Tensor | None  # [1, N, K] the prompt's audio rows, then the last rows
    prompt_ids: torch.Tensor  # [1, L] the whole prompt, as it was tokenized
    prompt_audio: torch.Tensor | None  # [1, N, K] its audio rows
    cached_tokens: int = 0  # prompt tokens already in ``cache`` (reused from a chunk)
    cached_rows: int = 0  # of which audio rows
    rows: list[torch.Tensor] = field(default_factory=list)  # generated rows [K]
    forwarded: int = 0  # generated rows fed back through the model (in the cache)
    steps: int = 0
    prefilled: bool = False
    ended: bool = False


@dataclass(slots=True)
class _Alone:
    """A request's reference state: its generator and its chunk's stream."""

    generator: torch.Generator
    stream: HiggsStream | None = None
    previous: HiggsStream | None = None  # the chunk just spoken (its cache is reused)


class HiggsReference(HiggsEngine):
    """``HiggsEngine`` with every request stepped alone through transformers'
    forward (same arguments; ``cuda_graphs`` does not apply)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._alone: dict[int, _Alone] = {}

    def start_stream(
        self,
        parts: Sequence[PromptPart],
        *,
        temperature: float,
        top_k: int,
        top_p: float,
        after: HiggsStream | None = None,
    ) -> HiggsStream:
        """Tokenize a prompt and set up sampling for it (no forward pass yet).

        Args:
            after: The utterance just finished, when this prompt extends its
                prompt with its answer (the next chunk of a text): its KV cache
                is reused as far as the new prompt agrees with what it holds,
                so only the rest is prefilled.
        """
        input_ids, audio_ids = self.tokenize(parts)
        k = self.num_codebooks
        processors = LogitsProcessorList(
            [
                HiggsAudioV2DelayPatternLogitsProcessor(
                    delay_pattern=[i + 1 for i in range(k)],
                    audio_bos_token_id=int(self.model.config.audio_bos_token_id),
                    audio_eos_token_id=int(self.model.config.audio_delay_token_id),
                    audio_stream_bos_id=self.stream_bos,
                    audio_stream_eos_id=self.stream_eos,
                    num_codebooks=k,
                    codebook_size=int(self.model.config.codebook_size),
                )
            ]
        )
        if temperature > 0:
            # generate()'s order: temperature, top-k, top-p (each only when it acts).
            if temperature != 1.0:
                processors.append(TemperatureLogitsWarper(temperature))
            if top_k:
                processors.append(TopKLogitsWarper(top_k))
            if top_p < 1.0:
                processors.append(TopPLogitsWarper(top_p))
        stream = HiggsStream(
            processors=processors,
            cache=DynamicCache(config=self.model.config),
            input_ids=input_ids,
            audio_ids=audio_ids,
            prompt_ids=input_ids,
            prompt_audio=audio_ids,
        )
        if after is not None:
            self._reuse_cache(after, stream)
        return stream

    def _reuse_cache(self, old: HiggsStream, new: HiggsStream) -> None:
        """Take over ``old``'s KV cache for the prefix ``new``'s prompt shares with it.

        The cache holds ``old``'s prompt and the rows it generated and fed back.
        When ``new``'s prompt starts with ``old``'s and goes on with those rows
        (the spoken chunk as a delay-pattern block, which it is unless the
        utterance was cut short or sampled a stream marker mid-way), only the
        tokens past the common prefix need a forward pass.
        """
        length = old.prompt_ids.shape[1]
        rows = 0 if old.prompt_audio is None else old.prompt_audio.shape[1]
        if old.cache.get_seq_length() != length + old.forwarded or new.prompt_audio is None:
            return
        if new.prompt_ids.shape[1] <= length + old.forwarded or not torch.equal(
            new.prompt_ids[:, :length], old.prompt_ids
        ):
            return
        if old.prompt_audio is not None and not torch.equal(
            new.prompt_audio[:, :rows], old.prompt_audio
        ):
            return
        generated = torch.stack(old.rows[: old.forwarded]) if old.forwarded else None
        upcoming = new.prompt_audio[0, rows : rows + old.forwarded]
        same = 0
        if generated is not None and upcoming.shape == generated.shape:
            agree = (upcoming == generated).all(dim=1).long()
            same = int(agree.cumprod(0).sum())
        audio_token = int(self.model.config.audio_token_id)
        delay_token = int(self.model.config.audio_delay_token_id)
        placeholders = new.prompt_ids[0, length : length + same]
        if not bool(((placeholders == audio_token) | (placeholders == delay_token)).all()):
            return
        old.cache.crop(-(old.forwarded - same))
        new.cache = old.cache
        new.cached_tokens = length + same
        new.cached_rows = rows + same

    def sample_row(
        self,
        stream: HiggsStream,
        *,
        do_sample: bool,
        generator: torch.Generator | None,
        ras_win_len: int,
        ras_max_repeat: int,
        max_new_tokens: int,
    ) -> torch.Tensor | None:
        """One decoding step: a new row ``[K]`` of delayed codes, or ``None`` once the
        utterance is over (all codebooks at stream EOS, or ``max_new_tokens``)."""
        if stream.ended:
            return None
        model = self.model
        config = model.config
        if not stream.prefilled:
            audio = None if stream.audio_ids is None else stream.audio_ids[:, stream.cached_rows :]
            mask = None
            if audio is not None and audio.shape[1] == 0:
                audio = None
            if audio is not None:
                mask = torch.ones(audio.shape[:2], dtype=torch.bool, device=self.device)
            out = model(
                input_ids=stream.input_ids[:, stream.cached_tokens :],
                audio_input_ids=audio,
                audio_input_ids_mask=mask,
                cache=stream.cache,
                use_cache=True,
                logits_to_keep=1,
            )
            stream.prefilled = True
        else:
            assert stream.audio_ids is not None
            out = model(
                audio_input_ids=stream.audio_ids[:, -1:, :],
                cache=stream.cache,
                use_cache=True,
                logits_to_keep=1,
            )
            stream.forwarded += 1
        logits = out.logits[:, -1, :].to(copy=True, dtype=torch.float32)
        scores = stream.processors(stream.input_ids, logits)
        if do_sample:
            probs = torch.nn.functional.softmax(scores, dim=-1)
            tokens = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
        else:
            tokens = torch.argmax(scores, dim=-1)
        k = self.num_codebooks
        raw = logits.reshape(-1, k, int(config.codebook_size))
        tokens = tokens.reshape(1, k)
        if ras_win_len > 0 and stream.audio_ids is not None:
            # Repetition-aware sampling: a code repeated too often in the last frames
            # is drawn again from the untempered distribution.
            window = stream.audio_ids[:, -ras_win_len:, :]
            repeated = (window == tokens.unsqueeze(1)) & (
                (window != self.stream_bos) & (window != self.stream_eos)
            )
            replace = repeated.sum(dim=1) >= ras_max_repeat
            redraw = (
                raw[replace]
                .softmax(dim=-1)
                .multinomial(1, replacement=True, generator=generator)
                .view(-1)
            )
            tokens[replace] = redraw
        all_eos = bool((tokens == self.stream_eos).all())
        any_eos = bool((tokens == self.stream_eos).any())
        row = tokens[:, None, :]
        stream.audio_ids = (
            row if stream.audio_ids is None else torch.cat([stream.audio_ids, row], 1)
        )
        last = int(stream.input_ids[0, -1])
        delay_id = int(config.audio_delay_token_id)
        next_text = delay_id if any_eos or last == delay_id else int(config.audio_token_id)
        if all_eos and config.eos_token_id is not None:
            eos = config.eos_token_id
            next_text = int(eos if isinstance(eos, int) else eos[0])
        stream.input_ids = torch.cat(
            [stream.input_ids, stream.input_ids.new_full((1, 1), next_text)], dim=1
        )
        # Past the prompt only the tails matter (the KV cache holds the rest): the
        # last text token, and the RAS window of audio rows. Keeping them bounded
        # keeps each step's work constant.
        stream.input_ids = stream.input_ids[:, -(k + 1) :]
        stream.audio_ids = stream.audio_ids[:, -MAX_RAS_WINDOW:]
        stream.steps += 1
        if all_eos or stream.steps >= max_new_tokens:
            stream.ended = True
        if all_eos:
            return None
        stream.rows.append(tokens[0])
        return tokens[0]

    def open_chunk(self, st: Any, after: HiggsStream | None = None) -> HiggsStream:
        """A stream for the request's current text chunk."""
        return self.start_stream(
            self.chunk_prompt(st),
            temperature=st.temperature,
            top_k=st.top_k,
            top_p=st.top_p,
            after=after,
        )

    def begin(self, jobs: Sequence[Job]) -> None:
        """Nothing: each request is stepped alone."""

    def step(self, jobs: Sequence[Job]) -> list[StepOutput]:
        self.codec_streams.tick()  # (the chunks' cadence, as the batched engine keeps it)
        with torch.no_grad():
            return [self._step_one(job) for job in jobs]

    def _step_one(self, job: Job) -> StepOutput:
        st = job.state
        alone = self._alone.get(id(st))
        if alone is None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(st.seed)
            alone = self._alone[id(st)] = _Alone(generator)
        if alone.stream is None:
            alone.stream = self.open_chunk(st, after=alone.previous)
            alone.previous = None
            st.chunk_frames = []
        stream = alone.stream
        row = self.sample_row(
            stream,
            do_sample=st.temperature > 0,
            generator=alone.generator,
            ras_win_len=st.ras_win_len,
            ras_max_repeat=st.ras_max_repeat,
            max_new_tokens=st.max_new_tokens,
        )
        job.steps += 1
        pieces: list[FloatAudio] = []
        k = self.num_codebooks
        # rows[0] is the all-BOS row; frame j needs rows 1 + j ... 1 + j + K - 1.
        rows = stream.rows
        if row is not None and len(rows) - 1 >= k:
            j = len(rows) - 1 - k
            frame = torch.stack([rows[1 + j + i][i] for i in range(k)])
            frame = frame.clamp(0, self.stream_bos - 1)
            st.chunk_frames.append(frame.tolist())  # (as the batched path keeps them)
            st.produced += 1
            chunk = st.decoder.push(frame.view(1, k, 1))
            if chunk is not None:
                pieces.append(chunk)
        done = False
        if stream.ended or st.produced >= st.max_frames:
            alone.previous = stream
            alone.stream = None
            if self._close_chunk(st):
                done = True
                tail = st.decoder.flush()
                if tail is not None:
                    pieces.append(tail)
        audio = None if not pieces else pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        advance_fraction(st, done)
        return StepOutput(
            audio=audio, fraction=st.fraction, seconds=st.produced / self.frame_rate, done=done
        )

    def finish(self, job: Job) -> None:
        if job.state is not None:
            self._alone.pop(id(job.state), None)
        super().finish(job)

    def _under_way(self, st: Any) -> bool:
        alone = self._alone.get(id(st))
        return alone is not None and alone.stream is not None
