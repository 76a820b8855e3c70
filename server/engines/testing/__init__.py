"""Random-weight test models, built in-process from configs with no network.

The real architectures at tiny sizes (``tiny-musicgen``, ``tiny-higgs``, ...)
or at the released sizes (``random-musicgen-large``, ``random-higgs-3b``): for
the tests, the benchmarks and offline demos. They make noise and are always
announced as test models. The engines never import this package; the model
loaders (``engines.higgs.loading``, ``engines.musicgen.loading``) build these by name.
"""
