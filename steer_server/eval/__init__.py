"""Evaluation through an OpenAI-compatible endpoint (:mod:`.endpoint`) and `make demo` (:mod:`.demo`)."""
