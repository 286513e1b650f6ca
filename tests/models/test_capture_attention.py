"""The log-sum-exp attention of layers 1..k: its softmax scale, when it must step aside, and the
layouts BASIC refuses at run time."""
from types import SimpleNamespace

import torch

import basic_workers as W
from nemo_basic.models.capture import AuxLossAutoScaler, fused_unsupported, sdpa_with_lse, softmax_scale_of


class _Attention(torch.nn.Module):
    def __init__(self, **attrs):
        super().__init__()
        for key, value in attrs.items():
            setattr(self, key, value)


def _config(**overrides):
    base = dict(softmax_scale=None, attention_dropout=0.0, window_size=None, window_attn_skip_freq=None,
                softmax_type="vanilla", fp8_dot_product_attention=False, fp8_multi_head_attention=False)
    return SimpleNamespace(**dict(base, **overrides))


def test_softmax_scale_of_te_and_local_modules():
    # Megatron's local DotProductAttention keeps the scale it applies (layer scaling included).
    assert softmax_scale_of(_Attention(softmax_scale=0.05, config=_config(softmax_scale=0.3)), 64) == 0.05
    # TE's DotProductAttention keeps no attribute: the config's scale is what it was built with.
    assert softmax_scale_of(_Attention(config=_config(softmax_scale=0.3)), 64) == 0.3
    assert softmax_scale_of(_Attention(config=_config()), 64) == 1.0 / 8.0


def test_softmax_scale_with_query_key_layer_scaling(spawn):
    """The local module keeps softmax_scale / layer_number and its softmax multiplies the scores
    by layer_number: the kernel must use the product, or layers 2..k run at the wrong temperature."""
    (r,) = spawn(W.layer_scaled_attention, 1)
    assert abs(r["stored_softmax_scale"] - 0.25 / 3) < 1e-12  # 1/√16, divided by layer number 3
    assert abs(r["scale"] - 0.25) < 1e-12
    assert r["module_err"] < 1e-5 and r["fused_err"] < 1e-5, r


def test_aux_loss_output_is_not_a_view():
    """The stage output that carries the aux loss can be freed in place by Megatron's pipeline
    schedule (deallocate_output_tensor asserts `_base is None` under deallocate_pipeline_outputs);
    values and both gradients are those of the identity plus the loss."""
    from megatron.core.pipeline_parallel.schedules import deallocate_output_tensor

    hidden = torch.randn(6, 2, 8, requires_grad=True)
    upstream = hidden * 2.0  # a non-leaf, as a decoder block's output is
    aux = (hidden ** 2).sum()
    AuxLossAutoScaler.set_loss_scale(0.5)
    try:
        out = AuxLossAutoScaler.apply(upstream, aux)
        assert out._base is None and torch.equal(out, upstream)
        grad_out = torch.randn_like(out)
        out.backward(grad_out)
    finally:
        AuxLossAutoScaler.set_loss_scale(None)
    torch.testing.assert_close(hidden.grad, 2.0 * grad_out + 0.5 * 2.0 * hidden.detach(), rtol=0, atol=1e-6)
    out2 = AuxLossAutoScaler.apply(hidden * 2.0, (hidden ** 2).sum())
    deallocate_output_tensor(out2, deallocate_pipeline_outputs=True)  # asserts on a view
    assert out2.data.numel() == 1


def test_fused_kernel_steps_aside_where_it_would_differ():
    plain = _Attention(config=_config(), attention_dropout=torch.nn.Dropout(0.0))
    assert fused_unsupported(plain, 1) is None
    dropout = _Attention(config=_config(attention_dropout=0.1), attention_dropout=0.1)  # TE keeps a float
    assert "dropout" in fused_unsupported(dropout, 1)
    dropout.eval()
    assert fused_unsupported(dropout, 1) is None  # no dropout outside training
    window = _Attention(config=_config(window_size=(8, 0), window_attn_skip_freq=2))
    assert "window" in fused_unsupported(window, 1) and fused_unsupported(window, 2) is None  # every 2nd is full
    assert "softmax_type" in fused_unsupported(_Attention(config=_config(softmax_type="off-by-one")), 1)
    assert "FP8" in fused_unsupported(_Attention(config=_config(fp8_dot_product_attention=True)), 1)


def test_grouped_kv_go_into_the_kernel_as_they_are():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 12, 16, generator=g)
    k, v = torch.randn(2, 2, 12, 16, generator=g), torch.randn(2, 2, 12, 16, generator=g)
    out, lse = sdpa_with_lse(q, k, v, scale=0.25)
    kk, vv = (t.double().repeat_interleave(4, dim=1) for t in (k, v))  # head h reads kv head h // 4
    scores = (q.double() @ kk.transpose(-1, -2)) * 0.25
    scores = scores.masked_fill(torch.ones(12, 12).triu(1).bool(), float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), scores.softmax(-1) @ vv, rtol=1e-5, atol=1e-5)


def test_packed_sequences_are_refused_by_name(spawn):
    (message,) = spawn(W.packed_sequences_rejected, 1)
    assert "packed (THD) sequences are not supported with BASIC" in message


def _walk(input_ids, tiles, img_seq_len, seq_len, text_lengths):
    """Image/text positions by walking the tokens; the i-th placeholder spans img_seq_len × tiles[i]."""
    batch = input_ids.shape[0]
    image = torch.zeros(batch, seq_len, dtype=torch.bool)
    text = torch.zeros(batch, seq_len, dtype=torch.bool)
    i = 0
    for b in range(batch):
        pos = 0
        for t, token in enumerate(input_ids[b].tolist()):
            span = img_seq_len * int(tiles[i]) if token == -200 else 1
            for p in range(pos, min(pos + span, seq_len)):
                if token == -200:
                    image[b, p] = True
                elif t < text_lengths[b]:
                    text[b, p] = True
            i += token == -200
            pos += span
    return image, text


def test_placement_masks_follow_nevas_rule_with_tiles_padding_and_truncation():
    from nemo_basic.models.neva import placement_masks
    from nemo_basic.supervision import RowLayout

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 100, (4, 12), generator=g)
    ids[0, 2] = -200                   # one image of 2 tiles
    ids[1, [0, 7]] = -200              # two images, 1 and 3 tiles (truncated at S)
    ids[3, 11] = -200                  # an image at the very end; sample 2 has none
    tiles = torch.tensor([2, 1, 3, 1], dtype=torch.int)
    lengths = torch.tensor([12, 12, 9, 12])
    for seq_len in (30, 48):
        image, text = placement_masks(ids, tiles, 6, seq_len, lengths)
        ref_image, ref_text = _walk(ids, tiles, 6, seq_len, lengths)
        assert torch.equal(image, ref_image) and torch.equal(text, ref_text)
        layout = RowLayout.from_masks(image, text)
        x = torch.randn(seq_len, 4, 5, generator=g, requires_grad=True)
        rows = layout.gather(x)
        for b in range(4):  # the boolean-mask selection, per sample, padded with zeros
            n = int(image[b].sum())
            torch.testing.assert_close(rows[b, :n], x[:, b][image[b]], rtol=0, atol=0)
            assert bool((rows[b, n:] == 0).all())
        back = layout.scatter(rows)
        torch.testing.assert_close(back, x * image.T[..., None], rtol=0, atol=0)
        back.sum().backward()  # the gradient reaches exactly the image rows
        torch.testing.assert_close(x.grad, image.T[..., None].expand_as(x).float(), rtol=0, atol=0)


def test_fp8_pads_the_combined_sequence_to_16_tokens(spawn):
    """TE's FP8 GEMMs need a token count divisible by 16; NeVA pads only for SP/CP/PP."""
    (out,) = spawn(W.fp8_sequence_padding, 1)
    assert out["None"][:2] == (35, 35)          # 20 tokens − 1 placeholder + 16 patches
    assert out["hybrid"][:2] == (48, 48) and out["hybrid"][2] == 0.0  # padding carries no loss
