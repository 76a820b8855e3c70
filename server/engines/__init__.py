"""Engines: the models behind the step interface.

``load_engines`` runs on the inference thread; it is the only place that
decides which engine serves a model name.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .base import Engine, EngineRequest, Job, ModelLoadError, StepOutput
from .higgs.voices import Scene, Voice

if TYPE_CHECKING:
    import torch

__all__ = ["Engine", "EngineRequest", "Job", "ModelLoadError", "StepOutput", "load_engines"]

log = logging.getLogger(__name__)

# Primitives oneDNN keeps prepared (``load_engines``): about 40 MB more at most
# with the test models' codecs than its default 1,024.
ONEDNN_PRIMITIVES = 8192


# How CUDA loads the kernels of torch's libraries, read when CUDA starts. torch
# asks for LAZY (each kernel loaded on its first use): a first crowd after
# start-up then meets kernels the warm-up did not (prefills of new lengths), and
# on an H200 one of its steps took 2.0 s, against 0.3-0.45 s with every kernel
# loaded at start-up (which costs the start-up about 3 s). A value set outside
# stays.
CUDA_MODULE_LOADING = "EAGER"


def resolve_device(device: str) -> str:
    """``auto``, ``cpu`` or ``cuda[:N]`` -> the device to load on; CUDA, where it
    is started here, with ``CUDA_MODULE_LOADING``."""
    os.environ.setdefault("CUDA_MODULE_LOADING", CUDA_MODULE_LOADING)
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} was asked for but CUDA is not available")
    return device


def _cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def load_engines(
    names: Sequence[str],
    device: str,
    *,
    dtype: str = "auto",
    threads: int = 0,
    left_context: int = 25,
    holdback: int = 4,
    first_frames: int = 1,
    chunk_frames: int = 10,
    max_chunk_frames: int = 50,
    codec_batch: int = 0,
    codec_windows: bool = False,
    remeasure: bool = False,
    max_prompt_tokens: int = 512,
    max_duration: float = 300.0,
    max_upload_seconds: float = 60.0,
    mbd: bool = False,
    higgs_codec: str | None = None,
    voices: Mapping[str, Voice] | None = None,
    scenes: Mapping[str, Scene] | None = None,
    max_new_tokens: int = 2048,
    prefill_budget_ms: float | None = None,
    prefix_cache_mb: float = 256.0,
    cuda_graphs: bool | None = None,
    pipelined_steps: bool = False,
    max_active: int = 4,
) -> dict[str, Engine]:
    """Load every model in ``names`` on ``device`` (``auto``, ``cpu``, ``cuda[:N]``),
    their generators in ``dtype`` (``engines.precision``).

    Test models come with a tiny Multi-Band Diffusion; with ``mbd``, the released
    one (from the hub) serves the released 32 kHz models, mono and stereo.
    HiggsAudio v2 names (``tiny-higgs``, ``bosonai/higgs-audio-…``, or a folder
    whose config says ``higgs_audio_v2``) get the text-to-speech engine, with
    ``voices`` and ``scenes``. ``cuda_graphs``: replay the decode steps as CUDA
    graphs (None: where the device is CUDA). ``pipelined_steps``: each step's
    host side run while the device computes the next (the engines'
    ``pipelined``). ``max_active``: requests decoded at once; 0: as many as the
    device's memory holds (each model sized in an equal part of it).
    ``remeasure``: what the warm-ups measure measured again, not taken from a
    start before (``measures``).
    """
    # oneDNN (convolutions on a CPU) prepares a primitive for each input shape it
    # meets and keeps 1,024; a codec's ~35 layers in every call shape of up to
    # ``codec_batch`` streams (made at warm-up) outgrow that, and a shape dropped
    # is prepared again on its next call (1.3-3x the call). Read at its first use.
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_PRIMITIVES))
    import torch

    from . import measures
    from .precision import model_dtype

    torch.set_grad_enabled(False)
    measures.REMEASURE = remeasure
    resolved = resolve_device(device)
    if cuda_graphs is None:
        cuda_graphs = resolved.startswith("cuda")
    # The step launches many small operations: threads beyond the cores there are
    # (the event loop and the clients need one) spin and wait on each other.
    torch.set_num_threads(threads or max(1, _cores() - 1))
    engines: dict[str, Engine] = {}
    shared: dict[str, Any] = {}  # the released MBD, loaded once for every model using it
    for name in names:
        log.info("loading %s on %s", name, resolved)
        # Each sizes its table (max_active 0) in an equal part of the memory free
        # once all are loaded (the scheduler sizes them all before any reserves).
        memory_share = 1.0 / len(names)
        if is_higgs_name(name):
            engines[name] = _load_higgs_engine(
                name,
                resolved,
                dtype=model_dtype(dtype, resolved),
                codec=higgs_codec,
                voices=voices,
                scenes=scenes,
                max_new_tokens=max_new_tokens,
                max_duration=max_duration,
                max_upload_seconds=max_upload_seconds,
                max_chunk_frames=max_chunk_frames,
                codec_batch=codec_batch or None,
                codec_windows=codec_windows,
                prefill_budget_ms=prefill_budget_ms,
                prefix_cache=int(prefix_cache_mb * 2**20),
                cuda_graphs=cuda_graphs,
                pipelined=pipelined_steps,
                max_active=max_active,
                memory_share=memory_share,
            )
            continue
        try:  # (audiocraft is imported here, for MusicGen models only)
            from .musicgen.engine import StreamSettings
        except ImportError as exc:
            raise ModelLoadError(
                f"could not load model {name!r}: MusicGen models need audiocraft ({exc})"
            ) from exc

        stream = StreamSettings(
            left_context,
            holdback,
            first_frames,
            chunk_frames,
            max_chunk_frames,
            codec_batch,
            codec_windows,
        )
        engines[name] = _load_musicgen_engine(
            name,
            resolved,
            dtype=model_dtype(dtype, resolved),
            mbd=mbd,
            shared=shared,
            stream=stream,
            max_duration=max_duration,
            max_upload_seconds=max_upload_seconds,
            max_prompt_tokens=max_prompt_tokens,
            prefill_budget_ms=prefill_budget_ms,
            cuda_graphs=cuda_graphs,
            pipelined=pipelined_steps,
            max_active=max_active,
            memory_share=memory_share,
        )
    return engines


def _load_musicgen_engine(
    name: str,
    device: str,
    *,
    dtype: torch.dtype | None,
    mbd: bool,
    shared: dict[str, Any],
    **kwargs: Any,
) -> Engine:
    from .musicgen.engine import MusicGenEngine
    from .musicgen.loading import load_musicgen
    from .musicgen.mbd import load_mbd_musicgen
    from .testing.musicgen import TINY_MUSICGEN

    try:
        model, test_model = load_musicgen(name, device, dtype)
    except Exception as exc:
        raise _load_error(name, exc, TINY_MUSICGEN) from exc
    diffusion = None
    # The released MBD decodes musicgen's 32 kHz EnCodec codes (each channel of a
    # stereo model separately, as audiocraft's demo does).
    codec = getattr(model.compression_model, "model", model.compression_model)
    at_32k = int(model.sample_rate) == 32000
    if at_32k and test_model:
        from .testing.mbd import build_tiny_mbd

        diffusion = build_tiny_mbd(codec, device=device)
    elif at_32k and mbd:
        if "mbd" not in shared:
            try:
                shared["mbd"] = load_mbd_musicgen(device)
            except Exception as exc:
                raise ModelLoadError(
                    f"could not load Multi-Band Diffusion ({type(exc).__name__}); "
                    "serve without --mbd, or with network access to the model hub"
                ) from exc
        diffusion = shared["mbd"]
    engine = MusicGenEngine(model, name=name, test_model=test_model, mbd=diffusion, **kwargs)
    if test_model:
        log.warning("%s is a random-weight test model: it makes noise", name)
    return engine


def is_higgs_name(name: str) -> bool:
    from .higgs.loading import is_higgs_name as check

    return check(name)


def _load_higgs_engine(
    name: str, device: str, *, dtype: torch.dtype | None, codec: str | None, **kwargs: Any
) -> Engine:
    from .higgs.engine import HiggsEngine
    from .higgs.loading import load_higgs
    from .testing.higgs import TINY_HIGGS

    try:
        loaded = load_higgs(name, codec, device, dtype)
        engine = HiggsEngine(loaded, name=name, **kwargs)
    except Exception as exc:
        raise _load_error(name, exc, TINY_HIGGS) from exc
    if loaded.test_model:
        log.warning("%s is a random-weight test model: it makes noise", name)
    return engine


def _load_error(name: str, exc: Exception, offline: str) -> ModelLoadError:
    """One line for the operator: what failed, why, and the offline alternative."""
    reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return ModelLoadError(
        f"could not load model {name!r} ({type(exc).__name__}: {reason}); "
        f"without network access, try the offline test model: wavecast serve --model {offline}"
    )
