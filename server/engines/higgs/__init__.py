"""HiggsAudio v2 on the batched core: the engine (``engine``), its model card
(``card``), prompts (``prompt``: layout, voices, scenes, text chunks), the
decoder over transformers' weights with its static KV cache (``decoder``), an
utterance's delay pattern, repetition-aware sampling and stop rules
(``utterance``), voices and scenes (``voices``) and loading (``loading``).

Nothing is imported here: the server reads voices and scenes without loading
the model's libraries.
"""
