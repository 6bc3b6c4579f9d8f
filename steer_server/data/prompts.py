"""How a sample becomes a prompt: the one layout, used by the analysis, the toy model, the served eval
and the server's instruction injection.

The paper's layout (arXiv 2602.03677, released modality-following files): the image(s), then
``Text Context: {context}``, then the instruction sentence, then the question with the format
constraint. :func:`user_text` builds the text part; :func:`insert_instruction` puts an instruction into
a text laid out without one, at the same place.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from .schema import LoadedSample, Sample

# The paper's instruction sentences (arXiv 2602.03677, released modality-following files).
INSTRUCTIONS: dict[str, str] = {
    "image": (
        "In case there is an inconsistency between the Text Context and the input image content, "
        "you must rely on the image content rather than the text context."
    ),
    "text": (
        "In case there is an inconsistency between the Text Context and the input image content, "
        "you must rely on the text context rather than the input image content."
    ),
}
# Held-out wordings of each instruction, for the analysis' transfer split (``--transfer wording:paraphrase``).
# Written in the toy models' word-level vocabulary (every word occurs in the texts above or in the
# synthetic questions), so the embedded models read them without unknown tokens.
PARAPHRASES: dict[str, tuple[str, ...]] = {
    "image": (
        "you must rely on the image content rather than the text context.",
        "Answer the question using the input image content rather than the Text Context.",
        "There is an inconsistency between the image and the text : rely on the image.",
    ),
    "text": (
        "you must rely on the text context rather than the input image content.",
        "Answer the question using the Text Context rather than the input image content.",
        "There is an inconsistency between the image and the text : rely on the text.",
    ),
}
FORMAT_CONSTRAINT = "Answer the question using a single word or phrase."
CONTEXT_LABEL = "Text Context: "


def context_line(context: str) -> str:
    """The context as one line of the prompt: the label, then the context with its whitespace runs
    (line breaks included) collapsed to single spaces, so that the line ends where the context does."""
    return CONTEXT_LABEL + " ".join(context.split())


def prompt_parts(sample: Sample, *, with_instruction: bool = True) -> dict[str, str]:
    """The text parts of the user turn, in prompt order: "context" (when the sample has one),
    "instruction" (when asked), "question" (with the format constraint). The image, if any, goes before
    them (the chat template's image placeholder). This is the layout; everything else renders it."""
    parts = {"context": context_line(sample.context)} if sample.context else {}
    if with_instruction:
        parts["instruction"] = sample.instruction or INSTRUCTIONS[sample.follow]
    parts["question"] = f"{sample.question} {FORMAT_CONSTRAINT}"
    return parts


def user_text(sample: Sample, *, with_instruction: bool = True) -> str:
    """The text part of the user turn: :func:`prompt_parts`, one per line."""
    return "\n".join(prompt_parts(sample, with_instruction=with_instruction).values())


def insert_instruction(text: str, instruction: str) -> str:
    """Put `instruction` into a text laid out without one, where :func:`user_text` puts it: on the line
    after the first line that holds ``Text Context: ``, or first when there is no such line.

    ``insert_instruction(user_text(s, with_instruction=False), INSTRUCTIONS[s.follow]) == user_text(s)``
    for every sample `s`, and the same holds for a whole rendered prompt when the sample has a context
    (the context line is found inside the chat template's text). A rendered prompt without a context line
    gets the instruction at its very start: only the user turn's own text says where the turn begins.
    """
    lines = text.split("\n")
    after = next((i + 1 for i, line in enumerate(lines) if CONTEXT_LABEL in line), 0)
    return "\n".join([*lines[:after], instruction, *lines[after:]])


def chat_messages(sample: Sample, *, with_instruction: bool = True) -> list[dict[str, Any]]:
    """The user turn as chat content parts (an image placeholder, then the text): what processors' chat
    templates render."""
    content: list[dict[str, Any]] = []
    if sample.image is not None:
        content.append({"type": "image"})
    content.append({"type": "text", "text": user_text(sample, with_instruction=with_instruction)})
    return [{"role": "user", "content": content}]


def openai_messages(loaded: LoadedSample, *, with_instruction: bool = True) -> list[dict[str, Any]]:
    """The same turn for an OpenAI-compatible endpoint: the image travels inline as a data URL."""
    messages = chat_messages(loaded.sample, with_instruction=with_instruction)
    if loaded.image_path is not None:
        messages[0]["content"][0] = {
            "type": "image_url",
            "image_url": {"url": image_data_url(loaded.image_path)},
        }
    return messages


def image_data_url(path: Path) -> str:
    """``data:image/...;base64,...`` of an image file (PNG by suffix, else JPEG)."""
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    mime = "image/png" if path.suffix.lower() == ".png" else "image/jpeg"
    return f"data:{mime};base64,{encoded}"
