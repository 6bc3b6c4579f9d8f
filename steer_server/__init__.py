"""modality-steer: find the attention heads that arbitrate between image and text in a multimodal LLM,
and steer them per request inside vLLM's OpenAI-compatible server."""

__version__ = "0.1.0"
