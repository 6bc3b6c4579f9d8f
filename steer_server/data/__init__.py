"""Conflict data: the JSONL schema and loader (:mod:`.schema`), the prompt layout (:mod:`.prompts`),
what counts as a successful answer and the modality-following ratio (:mod:`.scoring`), the synthetic
generator (:mod:`.synth`) and the importer of the paper's released files (:mod:`.importer`)."""
