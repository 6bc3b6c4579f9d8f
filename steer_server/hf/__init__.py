"""The transformers side, shared by the analysis and the toy model: loading a supported MLLM, encoding
samples in the one prompt layout (:mod:`.model`), and the hook points into its language model
(:mod:`.hooks`)."""
