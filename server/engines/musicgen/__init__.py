"""MusicGen on the batched core: the engine (``engine``), its model card
(``card``), conditioning and prefill (``conditioning``, with a melody's analysis
in ``melody``), the decoder over audiocraft's weights with its static KV cache
(``decoder``), the delay pattern and long-form windows (``windows``), loading
(``loading``) and the Multi-Band Diffusion post-stage (``mbd``).

Nothing is imported here: the engine needs audiocraft, which a speech-only
server does without.
"""
