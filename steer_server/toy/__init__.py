"""The embedded default model: a tiny LLaVA trained on CPU to arbitrate between image and text, with a
known arbitration circuit. Its tokenizer (:mod:`.tokenizer`), architecture and tiny-model builders
(:mod:`.model`), training (:mod:`.training`) and model card (:mod:`.card`); the weights are package data
in `checkpoint/`."""
