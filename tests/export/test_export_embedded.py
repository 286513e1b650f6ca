"""The embedded default's stage-1 and stage-2 training checkpoints export with ``export-hf`` and no
model flag (only ``--dtype float32`` for exact logits), and the exports work as served models:

* a fresh Python process of the venv that never imports nemo_basic loads them with transformers,
  ``processor.apply_chat_template`` with an image part builds the prompt, greedy ``generate``
  continues it exactly as greedy decoding with the training checkpoint (our Megatron NeVA) does, and
  the logits equal the checkpoint's: in float64 on both sides to 1e-8; in float32, as served, within
  the float32 rounding of SmolLM2's residual stream (entries up to ~2.2e4, so 1e-4 is below one
  float32 ulp there; the bound is 3e-2);
* the image processor is the one training used (112 px, recorded in the checkpoint), the chat
  template renders and tokenises a conversation exactly as the training data pipeline
  (`nemo_basic.data.templates`) does, and the text config keeps SmolLM2's 8192-token context.

The checkpoints come from the README's main jobs shortened to one step of one sample per stage.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
NEW_TOKENS = 4
IMAGE_TOKENS = 64  # 112 px / patch 14 = 8 x 8, the class token dropped


@pytest.fixture(scope="module")
def checkpoints(embedded_runs):
    # The embedded default, trained once for the suite (tests/conftest.py).
    return {stage: embedded_runs[stage]["summary"]["checkpoint"] for stage in (1, 2)}


@pytest.fixture(scope="module")
def exports(checkpoints, tmp_path_factory):
    from nemo_basic.convert import ensure_model_parallel
    from nemo_basic.export.__main__ import main

    root = tmp_path_factory.mktemp("hf")
    out = {}
    for stage, ckpt in checkpoints.items():
        out[stage] = root / f"stage{stage}"
        ensure_model_parallel()
        assert main(["export-hf", "--checkpoint", ckpt, "--out", str(out[stage]), "--dtype", "float32"]) == 0
    return out


def scene_image(tmp_path_factory) -> Path:
    import numpy as np
    from PIL import Image

    path = tmp_path_factory.getbasetemp() / "scene.png"
    if not path.exists():
        rng = np.random.default_rng(0)
        pixels = np.full((90, 120, 3), 230, dtype=np.uint8)
        pixels[20:70, 30:80] = (200, 30, 30)                       # a red square, and some texture
        pixels += rng.integers(0, 20, pixels.shape, dtype=np.uint8)
        Image.fromarray(pixels).save(path)
    return path


def text(t: str) -> dict:
    return {"type": "text", "text": t}


CONVERSATIONS = {  # (training-data turns, the same as chat messages: list contents, as transformers needs)
    1: ([{"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": "A red square on a grey background."}],
        [{"role": "user", "content": [{"type": "image"}]},
         {"role": "assistant", "content": [text("A red square on a grey background.")]}]),
    2: ([{"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": "A red square."},
         {"from": "human", "value": "Where is it?"}, {"from": "gpt", "value": "Left of the centre."}],
        [{"role": "user", "content": [{"type": "image"}, text("What is in the picture?")]},
         {"role": "assistant", "content": [text("A red square.")]},
         {"role": "user", "content": [text("Where is it?")]},
         {"role": "assistant", "content": [text("Left of the centre.")]}]),
}
PROMPTS = {1: [{"role": "user", "content": [{"type": "image"}]}],
           2: [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]}

SERVE = r"""
import json, sys, torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
export, image_path, conversation, prompt, out, new_tokens = sys.argv[1:]
image = Image.open(image_path).convert("RGB")
def with_image(messages):
    messages = json.loads(messages)
    for m in messages:
        if isinstance(m["content"], list):
            for part in m["content"]:
                if part["type"] == "image":
                    part["image"] = image
    return messages
processor = AutoProcessor.from_pretrained(export)
model = LlavaForConditionalGeneration.from_pretrained(export).eval()
full = processor.apply_chat_template(with_image(conversation), tokenize=True, return_dict=True, return_tensors="pt")
ask = processor.apply_chat_template(with_image(prompt), add_generation_prompt=True, tokenize=True, return_dict=True,
                                    return_tensors="pt")
with torch.no_grad():
    logits = model(**full).logits
    generated = model.generate(**ask, max_new_tokens=int(new_tokens), min_new_tokens=int(new_tokens), do_sample=False)
new = generated[0, ask["input_ids"].shape[1]:]
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("nemo_basic", "megatron", "nemo"))
served_dtype = str(model.dtype)
# The float64 reference, after everything served: transformers' LlamaRMSNorm computes in float32
# whatever its input dtype, so for a float64 forward pass it is made to compute in float64, and
# attention is SDPA (the eager path takes its softmax in float32).
from transformers.models.llama import modeling_llama
def rms_norm_float64(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))
modeling_llama.LlamaRMSNorm.forward = rms_norm_float64
model = model.double()
model.set_attn_implementation("sdpa")
with torch.no_grad():
    logits64 = model(input_ids=full["input_ids"], attention_mask=full["attention_mask"],
                     pixel_values=full["pixel_values"].double()).logits
torch.save({"input_ids": full["input_ids"], "pixel_values": full["pixel_values"], "logits": logits,
            "logits64": logits64, "ask_ids": ask["input_ids"], "new_ids": new}, out)
print(json.dumps({"text": processor.decode(new), "dtype": served_dtype, "loaded": loaded}))
"""


def serve_in_fresh_process(export: Path, stage: int, image: Path, out: Path) -> dict:
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", SERVE, str(export), str(image), json.dumps(CONVERSATIONS[stage][1]),
                           json.dumps(PROMPTS[stage]), str(out), str(NEW_TOKENS)],
                          capture_output=True, text=True, timeout=600, cwd="/", env=dict(clean, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-5000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**report, **torch.load(out)}


def collapse_image_run(ids: torch.Tensor, image_id: int) -> torch.Tensor:
    """HF ids (the image token repeated per image token) -> NeVA ids (one -200 per image)."""
    from nemo_basic.data.templates import IMAGE_TOKEN_INDEX

    out, previous = [], None
    for t in ids.tolist():
        if t == image_id:
            if previous != image_id:
                out.append(IMAGE_TOKEN_INDEX)
        else:
            out.append(t)
        previous = t
    return torch.tensor([out])


def neva_logits(mcore, ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    t = ids.shape[1]
    with torch.no_grad():
        return mcore(input_ids=ids, position_ids=torch.arange(t)[None], images=pixels,
                     num_image_tiles=torch.ones(pixels.shape[0], dtype=torch.int))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_export_serves_like_the_checkpoint(stage, checkpoints, exports, tmp_path, tmp_path_factory):
    from nemo_basic.convert import ensure_model_parallel
    from nemo_basic.export.hf import load_neva_from_checkpoint
    from nemo_basic.models.basic_config import BasicConfig

    export = exports[stage]
    config = json.loads((export / "config.json").read_text())
    image_id = config["image_token_index"]
    got = serve_in_fresh_process(export, stage, scene_image(tmp_path_factory), tmp_path / "served.pt")
    assert got["loaded"] == ["nemo_basic.compat.torchvision_shim"], got["loaded"]  # transformers only
    assert got["dtype"] == "torch.float32"
    assert tuple(got["pixel_values"].shape) == (1, 3, 112, 112)   # the training-time processor
    assert int((got["input_ids"] == image_id).sum()) == IMAGE_TOKENS

    ensure_model_parallel()
    mcore, _ = load_neva_from_checkpoint(checkpoints[stage], {"basic": BasicConfig(enabled=False)})
    mcore.eval()
    vocab = image_id  # the text vocabulary; the image token row is the export's addition
    neva_ids = collapse_image_run(got["input_ids"][0], image_id)

    # greedy decoding with the checkpoint (float32, as served) continues the prompt with the same tokens
    ids, pixels = collapse_image_run(got["ask_ids"][0], image_id), got["pixel_values"]
    for _ in range(NEW_TOKENS):
        nxt = neva_logits(mcore, ids, pixels)[0, -1, :vocab].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    assert ids[0, -NEW_TOKENS:].tolist() == got["new_ids"].tolist()
    assert len(got["text"]) > 0

    # float32 logits, as served: equal within float32 rounding of SmolLM2's residual stream, whose
    # largest entries reach ~2.2e4 (one float32 ulp there is 2e-3; measured differences <= 8e-3)
    ref32 = neva_logits(mcore, neva_ids, pixels)
    assert ref32.shape[1] == got["logits"].shape[1] and ref32.abs().max() > 1.0
    torch.testing.assert_close(got["logits"][..., :vocab], ref32[..., :vocab], atol=3e-2, rtol=0)
    # the same weights computed in float64 on both sides: equal far below 1e-4 (measured 2e-12)
    ref64 = neva_logits(mcore.double(), neva_ids, pixels.double())
    torch.testing.assert_close(got["logits64"][..., :vocab], ref64[..., :vocab], atol=1e-8, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_chat_template_is_the_training_template(stage, exports, tmp_path_factory):
    """Rendered and tokenised as `nemo_basic.data.templates` renders and tokenises the training data."""
    from PIL import Image
    from transformers import AutoProcessor

    from nemo_basic.data.templates import IMAGE_TOKEN_INDEX, render, tokenize_conversation

    template = {1: "plain", 2: "vicuna_v1"}[stage]
    processor = AutoProcessor.from_pretrained(str(exports[stage]))
    turns, messages = copy.deepcopy(CONVERSATIONS[stage])
    tok = processor.tokenizer
    expected_text = "".join(t for t, _ in render(turns, template, tok.eos_token))
    assert processor.apply_chat_template(messages, tokenize=False) == expected_text
    # string contents (vLLM's "string" content format: the placeholder already in the text) render the same
    as_strings = [{"role": m["role"], "content": "".join("<image>\n" if p["type"] == "image" else p["text"]
                                                         for p in m["content"])} for m in messages]
    assert processor.apply_chat_template(as_strings, tokenize=False) == expected_text
    # the generation prompt: what training put before the answer
    prompt = processor.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert expected_text.startswith(prompt) and prompt.endswith({1: "<image>", 2: " ASSISTANT:"}[stage])
    image = Image.open(scene_image(tmp_path_factory)).convert("RGB")
    for part in messages[0]["content"]:
        if part["type"] == "image":
            part["image"] = image
    ids = processor.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"][0]
    image_id = tok.convert_tokens_to_ids(processor.image_token)
    reference = []
    for t in tokenize_conversation(turns, template, tok).ids:
        reference += [image_id] * IMAGE_TOKENS if t == IMAGE_TOKEN_INDEX else [t]
    assert list(ids) == reference


@pytest.mark.slow
def test_export_layout_for_servers(checkpoints, exports):
    """Config, processor and file facts a server reads, for both stages."""
    from nemo_basic.export.serving import read_serving_record

    llm = json.loads((Path(os.path.expanduser(os.environ.get("NEMO_BASIC_CACHE", "~/.cache/nemo_basic")))
                      / "smollm2-135m-instruct" / "config.json").read_text())
    for stage, export in exports.items():
        config = json.loads((export / "config.json").read_text())
        assert config["text_config"]["max_position_embeddings"] == llm["max_position_embeddings"] == 8192
        proc = json.loads((export / "processor_config.json").read_text())
        assert proc["patch_size"] == 14 and proc["vision_feature_select_strategy"] == "default"
        assert proc["image_token"] == "<image>" and proc["num_additional_image_tokens"] == 1
        pre = json.loads((export / "preprocessor_config.json").read_text())
        assert pre["crop_size"] == {"height": 112, "width": 112} and pre["size"] == {"shortest_edge": 112}
        assert pre["image_processor_type"] == "LlavaImageProcessor" and pre["do_pad"] is True  # as training
        record = read_serving_record(checkpoints[stage])   # what training saved in the checkpoint
        assert record["template"] == {1: "plain", 2: "vicuna_v1"}[stage] and record["image_process_mode"] == "pad"
        assert record["max_position_embeddings"] == 8192
        assert record["image_processor"]["crop_size"] == {"height": 112, "width": 112}
        for path in export.iterdir():
            assert path.stat().st_mode & 0o777 == 0o644, path
