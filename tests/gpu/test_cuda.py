"""GPU checks (marker `gpu`): skipped cleanly on machines without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wavecast.protocol import resolve_params
from wavecast.server.engines.base import EngineRequest
from wavecast.server.engines.musicgen import MusicGenEngine
from wavecast.server.engines.tiny import build_tiny_musicgen

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_tiny_model_streams_exactly_on_cuda() -> None:
    model = build_tiny_musicgen(device="cuda")
    engine = MusicGenEngine(model, name="tiny-musicgen", test_model=True)
    params = resolve_params(engine.info.params, {"duration": 2.0, "top_k": 1, "seed": 0})
    job = engine.prepare(EngineRequest("g", "gpu", params))
    chunks = []
    while True:
        out = engine.step([job])[0]
        if out.audio is not None:
            chunks.append(out.audio)
        if out.done:
            break
    codes = engine.codes_of(job)
    model.set_generation_params(duration=2.0, top_k=1)
    _, reference = model.generate(["gpu"], return_tokens=True)
    assert torch.equal(codes, reference)
    full = model.compression_model.decode(codes, None)[0].transpose(0, 1).float().cpu().numpy()
    assert np.abs(np.concatenate(chunks) - full).max() <= 1e-3
