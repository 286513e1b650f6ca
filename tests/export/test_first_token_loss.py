"""Stage 1's first caption token: trained, as LLaVA trains it, and the LM loss is HF LLaVA's.

NeVA's `_preprocess_data` zeroes the loss mask at every image position, including each image's
last one, whose label is the token after the image. `BasicNevaConfig.train_first_token_after_image`
(default True) supervises that prediction once; False is NeVA's own behaviour.
"""
import pytest
import torch

import _export_workers as W
from nemo_basic.convert import ensure_model_parallel
from nemo_basic.models.basic_config import BasicConfig


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
    from transformers import LlavaForConditionalGeneration

    from nemo_basic.export.hf import import_hf_llava, load_neva_from_checkpoint

    llava_dir = W.make_llava(tmp_path_factory.mktemp("hf") / "llava", seed=11)
    hf = LlavaForConditionalGeneration.from_pretrained(str(llava_dir), attn_implementation="eager").eval()
    ensure_model_parallel()
    ckpt = import_hf_llava(llava_dir, tmp_path_factory.mktemp("ours") / "ckpt", seq_length=128,
                           basic=BasicConfig(layers=2))
    mcore, _ = load_neva_from_checkpoint(ckpt)
    return hf, mcore.eval()


def _caption_batch(pre=3, post=6, seed=0):
    """A prompt, one image, a caption: LLaVA's usual labels (prompt and image -100) and NeVA's
    shifted labels with a loss mask on the caption tokens."""
    hf_ids, neva_ids, pixels = W.neva_inputs(batch=2, pre=pre, post=post, seed=seed)
    hf_labels = hf_ids.clone()
    hf_labels[:, : pre + W.M] = -100
    labels = torch.cat([neva_ids[:, 1:], torch.zeros(2, 1, dtype=torch.long)], 1)  # label[t] = token t + 1
    loss_mask = torch.zeros(neva_ids.shape)
    loss_mask[:, pre: pre + post] = 1.0  # from the placeholder on: every label is a caption token
    return hf_ids, hf_labels, neva_ids, labels, loss_mask, pixels


def _ours(mcore, neva_ids, labels, loss_mask, pixels):
    b, t = neva_ids.shape
    with torch.no_grad():
        per_token, final_mask = mcore(input_ids=neva_ids, position_ids=torch.arange(t)[None].expand(b, -1),
                                      images=pixels, num_image_tiles=torch.ones(b, dtype=torch.int),
                                      labels=labels, loss_mask=loss_mask)
    return (per_token * final_mask).sum() / final_mask.sum(), final_mask


def test_lm_loss_equals_hf_llava_with_the_first_caption_token(hf_and_ours):
    hf, mcore = hf_and_ours
    pre, post = 3, 6
    hf_ids, hf_labels, neva_ids, labels, loss_mask, pixels = _caption_batch(pre, post)
    with torch.no_grad():
        ref = hf(input_ids=hf_ids, pixel_values=pixels, labels=hf_labels).loss
    loss, final_mask = _ours(mcore, neva_ids, labels, loss_mask, pixels)
    last_image = pre + W.M - 1
    assert bool((final_mask[:, last_image] == 1).all())          # the first caption token, once
    assert int(final_mask.sum()) == 2 * post                     # = HF's count of supervised labels
    assert bool((final_mask[:, pre:last_image] == 0).all())       # no other image position
    torch.testing.assert_close(loss.double(), ref.double(), rtol=1e-5, atol=0)


def test_nevas_own_masking_is_one_switch_away(hf_and_ours):
    hf, mcore = hf_and_ours
    pre, post = 3, 6
    _, _, neva_ids, labels, loss_mask, pixels = _caption_batch(pre, post, seed=1)
    mcore.config.train_first_token_after_image = False
    try:
        _, final_mask = _ours(mcore, neva_ids, labels, loss_mask, pixels)
    finally:
        mcore.config.train_first_token_after_image = True
    assert bool((final_mask[:, pre + W.M - 1] == 0).all())       # NeVA: never trained
    assert int(final_mask.sum()) == 2 * (post - 1)
