"""`basic_neva_config_from_hf`: an HF LLM + an HF vision encoder -> the stage-1 BASIC NeVA.

Checked against the HF models themselves: the language model's logits on text equal the HF LLM's,
and what NeVA feeds the projector equals the HF encoder's hidden state at the configured layer
(class token dropped for CLIP / DINOv2, every token kept for SigLIP). The stage-1 checkpoint
(`init-from-hf`, DINOv2 + tied embeddings) exports to an HF LLaVA whose logits equal ours.
"""
import pytest
import torch

import _export_workers as W
from nemo_basic.convert import ensure_model_parallel
from nemo_basic.models.basic_config import BasicConfig


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    return {"llm": W.make_llm(root / "llm", tied=False), "llm_tied": W.make_llm(root / "llm-tied", tied=True),
            **{kind: W.make_vision(root / kind, kind) for kind in ("clip", "siglip", "dinov2")}}


def build(llm_dir, vision_dir, **kw):
    from nemo_basic.export.hf import ensure_microbatch_calculator
    from nemo_basic.models.builder import basic_neva_config_from_hf, load_hf_weights, tokenizer_from_hf

    ensure_model_parallel()
    ensure_microbatch_calculator()
    config = basic_neva_config_from_hf(llm_dir, vision_dir, basic=BasicConfig(layers=1), seq_length=128, **kw)
    tokenizer = tokenizer_from_hf(llm_dir)
    model = config.configure_model(tokenizer)
    load_hf_weights(model, llm_dir)
    return config, tokenizer, model.eval()


def hf_vision(kind, path):
    from transformers import CLIPVisionModel, Dinov2Model, SiglipVisionModel

    cls = {"clip": CLIPVisionModel, "siglip": SiglipVisionModel, "dinov2": Dinov2Model}[kind]
    return cls.from_pretrained(str(path)).eval()


@pytest.mark.parametrize("kind,tied", [("clip", False), ("siglip", False), ("dinov2", True)])
def test_stage1_language_and_vision_equal_hf(parts, kind, tied):
    from transformers import LlamaForCausalLM

    from nemo_basic.models.builder import image_seq_length

    llm_dir = parts["llm_tied" if tied else "llm"]
    config, tokenizer, model = build(llm_dir, parts[kind])
    class_tokens = 0 if kind == "siglip" else 1
    assert image_seq_length(config) == W.M and config.vision_transformer_config.class_token_len == class_tokens
    assert tokenizer.vocab_size == W.TOKENS and model.capture.vocab_size == W.TOKENS  # BASIC's true vocabulary
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("vision_projection.") for n in trainable)  # stage 1: projector only

    # language model on text
    hf_llm = LlamaForCausalLM.from_pretrained(str(llm_dir)).eval()
    ids = torch.randint(3, W.TOKENS, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = hf_llm(ids).logits
        logits = model.language_model(input_ids=ids, position_ids=torch.arange(12)[None].expand(2, -1),
                                      attention_mask=None)
    vocab = ref.shape[-1]
    torch.testing.assert_close(logits[..., :vocab], ref, atol=1e-4, rtol=0)
    assert model.language_model.share_embeddings_and_output_weights == tied

    # vision features: what NeVA feeds the projector = HF hidden_states[-2], class token dropped
    seen = []
    hook = model.vision_projection.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach()))
    _, neva_ids, pixels = W.neva_inputs()
    with torch.no_grad():
        W.neva_forward(model, neva_ids, pixels)
        expected = hf_vision(kind, parts[kind])(pixels, output_hidden_states=True).hidden_states[-2]
    hook.remove()
    torch.testing.assert_close(seen[0], expected[:, class_tokens:].transpose(0, 1), atol=1e-5, rtol=0)
    if kind == "dinov2":  # 28 px input on a 56 px pre-training grid: HF interpolated, so did we
        assert config.vision_transformer_config.hf_config["image_size"] == 56 and pixels.shape[-1] == W.IMG


def test_stage1_checkpoint_exports_to_hf_llava(parts, tmp_path):
    """init-from-hf (DINOv2, tied embeddings, tokenizer without <image>) -> export -> HF logits = ours."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from nemo_basic.export.hf import export_hf_llava, init_from_hf, load_neva_from_checkpoint

    ensure_model_parallel()
    ckpt = init_from_hf(parts["llm_tied"], parts["dinov2"], tmp_path / "stage1", basic=BasicConfig(layers=1),
                        seq_length=128)
    out = export_hf_llava(ckpt, tmp_path / "hf", dtype="float32")
    processor = AutoProcessor.from_pretrained(str(out))
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert image_id == W.TOKENS  # added after the 250 words: the embedding grew by one zero row
    hf = LlavaForConditionalGeneration.from_pretrained(str(out), attn_implementation="eager").eval()
    assert hf.config.vision_feature_select_strategy == "default" and hf.config.text_config.vocab_size == W.TOKENS + 1
    assert hf.lm_head.weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()  # tied

    image = Image.fromarray((np.random.default_rng(1).random((33, 45, 3)) * 255).astype("uint8"))
    inputs = processor(images=image, text="w7 <image> w9 w10 w11", return_tensors="pt")
    hf_ids = inputs["input_ids"]
    assert int((hf_ids == image_id).sum()) == W.M
    first = int((hf_ids[0] == image_id).nonzero()[0])
    neva_ids = torch.cat([hf_ids[:, :first], torch.tensor([[-200]]), hf_ids[:, first + W.M:]], dim=1)

    ensure_model_parallel()
    mcore, _ = load_neva_from_checkpoint(ckpt)
    with torch.no_grad():
        ref = hf(**inputs).logits
        logits = W.neva_forward(mcore.eval(), neva_ids, inputs["pixel_values"])
    torch.testing.assert_close(logits[..., :W.TOKENS], ref[..., :W.TOKENS], atol=1e-4, rtol=0)
    assert torch.all(ref[..., W.TOKENS] == 0)  # the image token's zero row
    generated = hf.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == hf_ids.shape[1] + 4


@pytest.mark.slow
def test_smollm2_dinov2_small_builds_and_matches_hf():
    """The embedded default: SmolLM2-135M-Instruct + DINOv2-small (224 px / 14 -> 256 image tokens)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from nemo_basic.models.builder import image_seq_length
    from nemo_basic.pretrained import dinov2_small_dir, smollm2_dir

    llm_dir = smollm2_dir()
    config, tokenizer, model = build(llm_dir, dinov2_small_dir(), vision_feature_layer=-2)
    assert image_seq_length(config) == 256 and config.vision_transformer_config.image_size == 224
    assert tokenizer.vocab_size == 49152 and model.capture.vocab_size == 49152
    assert config.language_transformer_config.vocab_size == 49152  # already a multiple of 128
    hf_tok = AutoTokenizer.from_pretrained(str(llm_dir))
    ids = torch.tensor([hf_tok("A photograph of a cat sitting on a red sofa.")["input_ids"]])
    hf_llm = LlamaForCausalLM.from_pretrained(str(llm_dir)).eval()
    with torch.no_grad():
        ref = hf_llm(ids).logits
        logits = model.language_model(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None],
                                      attention_mask=None)
    torch.testing.assert_close(logits[..., :49152], ref, atol=2e-4, rtol=1e-4)
    assert torch.equal(logits.argmax(-1), ref.argmax(-1))
