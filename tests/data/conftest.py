"""Fixtures for the data tests: a tiny offline tokenizer, a small CLIP processor, image and JSON writers."""
from __future__ import annotations

import json
import re

import pytest
from PIL import Image

# LLaVA's vicuna_v1 system prompt, written out here (the expectation the template is checked against).
LLAVA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the user's questions.")

# Every word the tests use. The tokenizer below splits like `tokenizers`' Whitespace pre-tokenizer
# (documented as the regex \w+|[^\w\s]+), so `words()` gives the expected token strings by hand.
VOCAB_TEXT = LLAVA_SYSTEM + """
USER ASSISTANT : . , ? ' ! Describe the image What color is circle square red blue green a an of
and how many shapes are there two one Where it top left Is this text only question answer yes no
caption first second third sky cat dog photo plus 2 3 5 What's Hello hi
"""

UNK, BOS, EOS = "<unk>", "<s>", "</s>"


def words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]+", text)


@pytest.fixture(scope="session")
def tiny_vocab() -> dict:
    vocab = {UNK: 0, BOS: 1, EOS: 2}
    for w in words(VOCAB_TEXT):
        vocab.setdefault(w, len(vocab))
    return vocab


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_vocab):
    """A word-level fast tokenizer that prepends <s> (like Llama's) and knows </s> as EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(tiny_vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK)


@pytest.fixture(scope="session")
def ids_of(tiny_vocab):
    def f(*pieces: str) -> list[int]:
        out = []
        for p in pieces:
            out += [tiny_vocab[p]] if p in (BOS, EOS) else [tiny_vocab[w] for w in words(p)]
        return out

    return f


@pytest.fixture(scope="session")
def clip_processor():
    """CLIP's processor class at a small size (mean/std are CLIP's defaults)."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})


def save_image(path, size=(40, 24), color=(200, 30, 30), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, color)
    img.save(path, format=fmt)
    return path


def write_json(path, records):
    path.write_text(json.dumps(records, indent=1))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def img():
    """``img(path, size, color, fmt)`` writes a plain-colour image."""
    return save_image


@pytest.fixture(scope="session")
def dump_json():
    return write_json


@pytest.fixture(scope="session")
def load_jsonl():
    return read_jsonl
