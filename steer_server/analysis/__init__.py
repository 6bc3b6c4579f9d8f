"""Offline analysis (transformers): find the attention heads that arbitrate between image and text,
check them, and write a profile.

Stages, one module each: the metric and batched scoring (:mod:`.metric`), gradient x activation
attribution (:mod:`.attribution`), exact ablation of the best candidates (:mod:`.ablation`), validation
of the selected heads (:mod:`.validation`), attention knockout between token groups (:mod:`.knockout`),
plots (:mod:`.plots`); :mod:`.pipeline` runs them in order and writes the outputs.
"""
