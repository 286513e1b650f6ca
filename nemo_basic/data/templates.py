"""Conversation templates and tokenisation, with the supervised tokens known exactly.

Two templates, as in LLaVA-1.5:

``plain`` (stage 1, captions): the human turn is dropped; the sample is ``<image>`` followed by
the caption and a newline (LLaVA's ``conv_llava_plain``, separator ``"\\n"``). Only the caption
and its newline are supervised.

``vicuna_v1`` (stage 2, instructions; LLaVA's ``conv_vicuna_v1``)::

    {SYSTEM} USER: {q1} ASSISTANT: {a1}{eos}USER: {q2} ASSISTANT: {a2}{eos}...

Only the gpt turns are supervised: the answer (from the space after ``ASSISTANT:``) and the end
token that closes it. ``{eos}`` is the LLM tokenizer's own end-of-sequence token (``</s>`` for
Vicuna/Llama, ``<|im_end|>`` for SmolLM2), so the template works for any LLM.

How tokens get their labels: the prompt is split at each ``<image>`` marker (the marker becomes the
single placeholder id ``IMAGE_TOKEN_INDEX = -200``, which the model expands to the image's
embeddings); each text chunk is tokenised on its own, as LLaVA's ``tokenizer_image_token`` does,
with the fast tokenizer's character offsets; a token is supervised when its first character lies
inside a supervised character span. The token ids are therefore those of the tokenizer on the
exact prompt text, never a re-tokenised answer searched for afterwards. The tokenizer's BOS is
prepended when the tokenizer itself adds one to a plain encode (Llama: yes; GPT-2 style: no).

`shift_and_truncate` then produces what NeVA consumes: ``tokens = ids[:-1]``,
``labels = supervised_ids[1:]`` (``IGNORE_INDEX`` elsewhere), truncated on the right so that the
model's combined length ``len(tokens) + n_images * (img_seq_len - 1)`` fits ``seq_length``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from nemo_basic.data.llava_json import GPT, HUMAN, IMAGE_MARKER

IMAGE_TOKEN_INDEX = -200  # NeMo's ImageToken.token_index and LLaVA's IMAGE_TOKEN_INDEX
IGNORE_INDEX = -100  # label of an unsupervised position

VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
TEMPLATES = ("plain", "vicuna_v1")


@dataclasses.dataclass
class TokenizedSample:
    ids: list[int]  # full sequence, -200 at each image
    supervised: list[bool]  # per id: True where the model must predict this id
    num_images: int


def unwrap_tokenizer(tokenizer: Any) -> Any:
    """Accept an HF tokenizer or NeMo's ``AutoTokenizer`` wrapper (``.tokenizer`` is the HF one)."""
    inner = getattr(tokenizer, "tokenizer", None)
    if inner is not None and hasattr(inner, "convert_tokens_to_ids"):
        tokenizer = inner
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"{type(tokenizer).__name__} is not a fast (Rust) Hugging Face tokenizer; the data pipeline needs "
            "its character offsets to mark supervised tokens. Load it with AutoTokenizer(..., use_fast=True)."
        )
    return tokenizer


def render(conversations: Sequence[dict], template: str, eos_token: str | None) -> list[tuple[str, bool]]:
    """The prompt as ``(text, supervised)`` pieces; joining the texts gives the full prompt."""
    if template == "plain":
        if len(conversations) != 2:
            raise ValueError(f"template 'plain' needs one human/gpt pair, got {len(conversations)} turns")
        return [(IMAGE_MARKER, False), (conversations[1]["value"] + "\n", True)]
    if template == "vicuna_v1":
        if not eos_token:
            raise ValueError("template 'vicuna_v1' needs a tokenizer with an eos_token")
        pieces = [(VICUNA_V1_SYSTEM + " ", False)]
        for j in range(0, len(conversations), 2):
            q, a = conversations[j], conversations[j + 1] if j + 1 < len(conversations) else None
            if q["from"] != HUMAN or (a is not None and a["from"] != GPT):
                raise ValueError(f"turns {j}, {j + 1}: expected a human turn then a gpt turn")
            pieces.append(("USER: " + q["value"] + " ASSISTANT:", False))
            if a is not None:
                pieces.append((" " + a["value"] + eos_token, True))
        return pieces
    raise ValueError(f"unknown template {template!r}; choose one of {TEMPLATES}")


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def tokenize_conversation(conversations: Sequence[dict], template: str, tokenizer: Any) -> TokenizedSample:
    """Token ids and the supervised flag of each, for one conversation (see the module docstring)."""
    tokenizer = unwrap_tokenizer(tokenizer)
    pieces = render(conversations, template, tokenizer.eos_token)
    text = "".join(t for t, _ in pieces)
    spans, pos = [], 0
    for t, sup in pieces:
        if sup:
            spans.append((pos, pos + len(t)))
        pos += len(t)

    def is_supervised(c: int) -> bool:
        return any(s <= c < e for s, e in spans)

    ids: list[int] = []
    supervised: list[bool] = []
    if _adds_bos(tokenizer):
        ids.append(tokenizer.bos_token_id)
        supervised.append(False)
    num_images = 0
    start = 0
    chunks = text.split(IMAGE_MARKER)
    for k, chunk in enumerate(chunks):
        if k > 0:
            ids.append(IMAGE_TOKEN_INDEX)
            supervised.append(False)
            num_images += 1
        if chunk:
            enc = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
            for tid, (s, _e) in zip(enc["input_ids"], enc["offset_mapping"]):
                ids.append(tid)
                supervised.append(is_supervised(start + s))
        start += len(chunk) + len(IMAGE_MARKER)
    return TokenizedSample(ids=ids, supervised=supervised, num_images=num_images)


@dataclasses.dataclass
class ShiftedSample:
    tokens: list[int]  # model input, length T
    labels: list[int]  # next-token targets aligned with tokens (IGNORE_INDEX when unsupervised)
    num_images: int  # images whose placeholder survived truncation (the first ones)
    truncated: bool


def shift_and_truncate(sample: TokenizedSample, seq_length: int, img_seq_len: int) -> ShiftedSample:
    """NeVA's input/label layout, cut on the RIGHT to fit ``seq_length``.

    ``tokens[i] = ids[i]`` and ``labels[i] = ids[i + 1]`` when that id is supervised. The kept
    prefix is the longest one whose combined length (each -200 counts ``img_seq_len``) is at most
    ``seq_length``; images whose placeholder falls beyond it are dropped with the text (they are the
    last ones, so the caller keeps the first ``num_images`` images).
    """
    if seq_length < 2:
        raise ValueError(f"seq_length must be at least 2, got {seq_length}")
    ids, sup = sample.ids, sample.supervised
    cost = 0
    keep = 0  # number of input tokens kept
    for tid in ids[:-1]:
        c = img_seq_len if tid == IMAGE_TOKEN_INDEX else 1
        if cost + c > seq_length:
            break
        cost += c
        keep += 1
    truncated = keep < len(ids) - 1
    tokens = list(ids[:keep])
    labels = [ids[i + 1] if sup[i + 1] else IGNORE_INDEX for i in range(keep)]
    num_images = sum(1 for t in tokens if t == IMAGE_TOKEN_INDEX)
    return ShiftedSample(tokens=tokens, labels=labels, num_images=num_images, truncated=truncated)
