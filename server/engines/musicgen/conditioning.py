"""MusicGen's conditioning: what the decoder attends to, computed as audiocraft does.

A request's description (T5) and, for melody models, the chroma of its
reference's melodic stems (Demucs) become the condition tensors of its two rows:
the conditional one and the null one of classifier-free guidance. Text-only
models encode the descriptions of the requests starting in the same step in one
call; melody models condition each request on its own, Demucs in pieces
(``melody``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Generator
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch
from audiocraft.models.musicgen import MusicGen
from audiocraft.modules.conditioners import ClassifierFreeGuidanceDropout

from wavecast.protocol import InvalidField

from ..pipelining import upload
from .melody import StemsInPieces, in_pieces
from .separation import drawing, draws_known

__all__ = ["Conditioning"]

Conditions = Any  # {name: (embeddings [2, T, D], mask [2, T])}, audiocraft's


class Conditioning:
    """The condition tensors of requests for one MusicGen model.

    Args:
        model: The audiocraft model.
        max_prompt_tokens: Longest description, in the text encoder's tokens.
    """

    def __init__(
        self,
        model: MusicGen,
        max_prompt_tokens: int,
        autocast: Callable[[], AbstractContextManager[Any]],
    ) -> None:
        self.model = model
        self.autocast = autocast  # the engine's steps' (``fresh_autocast``)
        self.provider = model.lm.condition_provider
        self.max_prompt_tokens = max_prompt_tokens
        conditioners = self.provider.conditioners
        description = None
        if "description" in conditioners:  # (a ModuleDict: no .get)
            description = conditioners["description"]
        # The text encoder's tokenizer: the prompt limit is counted in its tokens,
        # by a copy of it (``_counter``). A fast tokenizer keeps its padding in its
        # backend and sets it at every call, from the call's arguments: a check
        # counting a prompt unpadded (on the event loop or the upload pool) could
        # turn the padding off between the inference thread's setting it and its
        # encoding a batch (the texts then come back of different lengths, and
        # the request fails), or find the backend in use and fail itself.
        self.tokenizer = getattr(description, "t5_tokenizer", None)
        self._counter = copy.deepcopy(self.tokenizer)
        self.device = torch.device(getattr(description, "device", model.device))
        # Where the description is the only condition (and is encoded as given), the
        # requests that start in the same step are encoded in one call
        # (``together``); otherwise each is conditioned on its own.
        self.together_ok = (
            self.tokenizer is not None
            and list(conditioners) == ["description"]
            and not getattr(description, "normalize_text", True)
        )
        # The empty text's length in tokens (the unconditional half's).
        # (The copy's first call sets its padding off, here, before any check.)
        self._empty_tokens = len(self._counter("")["input_ids"]) if self._counter is not None else 0
        self.melody = "self_wav" in conditioners
        # Melody models: Demucs separates a reference a layer per pause.
        self.stems = None
        if self.melody and hasattr(conditioners["self_wav"], "demucs"):
            self.stems = StemsInPieces.of(conditioners["self_wav"])

    def check_prompt(self, text: str) -> None:
        """Refuse a description longer than the text encoder is given (in its tokens)."""
        if self._counter is None:
            return
        count = len(self._counter(text)["input_ids"])
        if count > self.max_prompt_tokens:
            raise InvalidField(
                f"prompt is {count} tokens long; this model reads at most "
                f"{self.max_prompt_tokens} (shorten the description)",
                field="prompt",
            )

    def attributes(self, prompt: str, melody: torch.Tensor | None) -> list[Any]:
        """audiocraft's ``ConditioningAttributes`` of one request (``melody``: the
        reference ``[C, T]`` at the model's rate, melody models only)."""
        if self.melody:
            attributes, _ = self.model._prepare_tokens_and_attributes(
                [prompt], None, melody_wavs=[melody] if melody is not None else None
            )
        else:
            attributes, _ = self.model._prepare_tokens_and_attributes([prompt], None)
        result: list[Any] = attributes
        return result

    def one(self, attributes: list[Any], py_random: Any) -> tuple[Conditions, Any]:
        """Condition tensors for the conditional and the null half, as LMModel.generate.

        Demucs (melody models) shifts its input at random, as Python's ``random``
        would: each request draws from a generator of its own (``drawing``), kept
        as its state between calls, so that its seed reproduces it whatever other
        threads draw meanwhile. Returns the tensors and the new state.
        """
        with drawing(py_random) as generator, torch.no_grad(), self.autocast():
            null = ClassifierFreeGuidanceDropout(p=1.0)(attributes)
            tokenized = self.provider.tokenize(attributes + null)
            conditions = self.provider(tokenized)
        return conditions, generator.getstate()

    def in_pieces(
        self, attributes: list[Any], py_random: Any
    ) -> Generator[float | None, None, tuple[Conditions, Any]]:
        """``one``, a melody's Demucs in pieces: a pause after each of its layers,
        with the part of the separation done (``melody.in_pieces``)."""
        return (yield from in_pieces(lambda: self.one(attributes, py_random), self.stems))

    @property
    def draws_known(self) -> bool:
        """Whether ``draws_after`` knows what a melody's analysis draws."""
        return self.stems is None or draws_known(self.stems.conditioner.demucs)

    def draws_after(self, attributes: list[Any], py_random: Any) -> Any | None:
        """The state of a request's draws after ``in_pieces(attributes,
        py_random)``, without its separation (``StemsInPieces.draws_after``):
        a later long-form window's, as the windows before it left them. None
        where its Demucs' draws are not known."""
        if self.stems is None:
            return py_random
        return self.stems.draws_after(lambda: self.one(attributes, py_random))

    def together(self, attributes: list[Any]) -> list[Conditions]:
        """Encode the descriptions of requests starting now in one call.

        Each request's pair (its text, and the empty text of the unconditional
        half) is cut back to the length it has when encoded alone (the longer of
        the two in tokens; the padding beyond is zeros, as alone), so each row's
        conditioning equals its solo one to float rounding (tested: logits within
        1e-5 of the solo run, codes equal).

        Only the descriptions go through the text encoder. The unconditional half
        is what audiocraft's encoding makes of the null description (what
        ``ClassifierFreeGuidanceDropout`` leaves a model conditioned on its
        description alone): the empty text, whose mask the conditioner zeroes and
        whose embeddings it multiplies by that mask, so zeros all through. A
        crowd's encoding is half as many texts (and no deep copy of every
        request's attributes).
        """
        with self.autocast():
            tokenized, own = self._tokenize_together(attributes)
            conditions = self.provider(tokenized)
        result = []
        for i, tokens in enumerate(own):
            length = max(self._empty_tokens, tokens)
            pairs = {}
            for name, (embeds, mask) in conditions.items():
                embeds, mask = embeds[i : i + 1, :length], mask[i : i + 1, :length]
                pairs[name] = (
                    torch.cat([embeds, torch.zeros_like(embeds)]),
                    torch.cat([mask, torch.zeros_like(mask)]),
                )
            result.append(pairs)
        return result

    def _tokenize_together(self, attributes: list[Any]) -> tuple[dict[str, Any], list[int]]:
        """The descriptions tokenized as audiocraft's text conditioner does (a
        missing one as the empty text, its mask zeroed), on the host, and sent
        to the device in one copy (not waiting for a step in flight); and each
        text's length in tokens, alone: its mask's (an empty text's is zeroed,
        and its length, the empty text's, is the floor anyway)."""
        assert self.tokenizer is not None
        entries = [attribute.text.get("description") or "" for attribute in attributes]
        host = self.tokenizer(entries, return_tensors="np", padding=True)
        mask = np.asarray(host["attention_mask"], dtype=np.int64)
        mask[[i for i, entry in enumerate(entries) if entry == ""]] = 0
        inputs = upload({"input_ids": host["input_ids"], "attention_mask": mask}, self.device)
        return {"description": inputs}, mask.sum(axis=1).tolist()

    def wrap_melody(
        self, attributes: list[Any], melody: Any, length: int, time_offset: float, window: float
    ) -> None:
        """Long form: the melody (``length`` samples) for the window starting at
        ``time_offset`` seconds, repeated as needed.

        The same as ``MusicGen._generate_tokens``: each window sees the reference
        from its own start time on, wrapped around when the reference is shorter.
        """
        from audiocraft.modules.conditioners import WavCondition

        wav_length = length
        if wav_length == 0:
            return
        rate = self.model.sample_rate
        initial_position = int(time_offset * rate)
        target_length = int(window * rate)
        positions = torch.arange(
            initial_position, initial_position + target_length, device=melody[0].device
        )
        attributes[0].wav["self_wav"] = WavCondition(
            melody[0][..., positions % wav_length],
            torch.full_like(melody[1], target_length),
            [rate] * melody[0].size(0),
            [None],
            [0.0],
        )
