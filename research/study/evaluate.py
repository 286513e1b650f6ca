"""Held-out evaluation of a trained study model, on its Hugging Face LLaVA export.

The live Megatron weights are converted in memory by the exporter (``export.llava``) into a
``transformers.LlavaForConditionalGeneration``; every number below is computed by that model, not
by the training code (only the image preprocessing is shared: the pixels the model was trained on).

- caption cross-entropy: mean next-token CE (nats) of each held-out caption under the stage-1
  (plain) prompt, then the mean over captions;
- QA (after stage 2): greedy answer to each held-out question (vicuna_v1 prompt, as training;
  bf16), exact match of the sentence with the reference after lower-casing and whitespace
  normalisation, and key-word match (`key_answer`);
- lens metrics (``nemo_basic.analysis``) of layers 0 (V) and k on the first ``lens_scenes`` held-out
  scenes, with their per-patch labels;
- cos(V, V̂): V̂ = Σ_l w_l h_l over layers 1..k with the paper's ``inc`` weights (the same target in
  every arm, whatever weighting the arm trained with), cosine per patch, mean over all patches of
  the held-out scenes; also cos(V, h_k).
"""
from __future__ import annotations

import os
import re
from typing import Dict, List

import torch

from nemo_basic.data.image import preprocess_image
from nemo_basic.data.templates import IMAGE_TOKEN_INDEX, tokenize_conversation
from nemo_basic.data import embedded as D

IMAGE_TOKEN = "<image>"


def hf_model(built, dtype=torch.bfloat16):
    """(LlavaForConditionalGeneration, tokenizer with the image token) from the live weights."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from nemo_basic.export.llava import hf_llava_config, mcore_to_hf_llava
    from nemo_basic.models.builder import layer_spec_of

    tok = AutoTokenizer.from_pretrained(built.llm_dir, local_files_only=True)
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    sd = {k: v.detach() for k, v in built.mcore.state_dict().items()
          if torch.is_tensor(v) and not k.endswith("_extra_state")}
    config = built.mcore.config
    rows = max(len(tok), image_id + 1)
    state = mcore_to_hf_llava(sd, config, layer_spec_of(sd), rows, dtype=dtype)
    hf_cfg = hf_llava_config(config, rows, image_id, dtype, pad_token_id=tok.pad_token_id,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    from transformers.modeling_utils import no_init_weights

    with no_init_weights():  # every weight is overwritten below; buffers (RoPE) are built as usual
        model = LlavaForConditionalGeneration(hf_cfg)
    result = model.load_state_dict(state, strict=False)
    if hf_cfg.tie_word_embeddings:
        model.tie_weights()
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and hf_cfg.tie_word_embeddings)]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"export does not match HF LLaVA: missing {missing[:5]}, unexpected "
                           f"{result.unexpected_keys[:5]}")
    model.config._attn_implementation = "eager"
    return model.to(dtype).eval(), tok


class Evaluator:
    ce_batch = 8  # held-out captions per forward

    def __init__(self, built, items: List[dict], protocol):
        self.built, self.items, self.p = built, items, protocol

    def _pixels(self, scene, dtype):
        return preprocess_image(scene.image, self.built.processor, "pad").unsqueeze(0).to(dtype)

    def _ids(self, conversations, template: str, tok, image_id: int, m: int):
        """HF LLaVA's input ids (the image token repeated m times) and the supervised flag per id."""
        t = tokenize_conversation(conversations, template, tok)
        ids, sup = [], []
        for i, s in zip(t.ids, t.supervised):
            if i == IMAGE_TOKEN_INDEX:
                ids += [image_id] * m
                sup += [False] * m
            else:
                ids.append(i)
                sup.append(s)
        return ids, sup

    def run(self, stage: int, k: int, pictures_dir: str, tag: str) -> dict:
        from nemo_basic.analysis.lens import HFLlava, run_lens
        from nemo_basic.analysis.render import render_image
        from nemo_basic.supervision import layer_weights

        # float32 for the measurements (bf16 rounding moved per-caption CE by ~1 % between batch
        # layouts), bf16 for generation (greedy answers; fast only on CPUs with AVX-512 BF16 / AMX, see engine).
        model, tok = hf_model(self.built, torch.float32)
        image_id = model.config.image_token_index
        m = self.built.img_seq_len
        dtype = model.dtype
        out: Dict[str, object] = {}
        # caption cross-entropy (stage-1 prompt) and cos(V, V-hat), from one batched forward: the
        # image comes first in the plain template, so its hidden states (causal) are those the
        # lens and the training target see.
        w = layer_weights(k, "inc").double()
        ce_items, cos_t, cos_k = [], [], []
        batch = self.ce_batch
        with torch.no_grad():
            for at in range(0, len(self.items), batch):
                chunk = self.items[at:at + batch]
                rows = [self._ids(D._conv([("Describe the image.", it["scene"].caption)], True), "plain", tok,
                                  image_id, m) for it in chunk]
                width = max(len(ids) for ids, _ in rows)
                ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
                att = torch.zeros((len(rows), width), dtype=torch.long)
                for r, (row, _) in enumerate(rows):
                    ids[r, :len(row)] = torch.tensor(row)
                    att[r, :len(row)] = 1
                pixels = torch.cat([self._pixels(it["scene"], dtype) for it in chunk])
                out_hf = model(input_ids=ids, attention_mask=att, pixel_values=pixels, output_hidden_states=True)
                logp = torch.log_softmax(out_hf.logits.float(), dim=-1)
                hs = out_hf.hidden_states  # [0] = the LM's input embeddings (V at the image), [l] after layer l
                for r, (row, sup) in enumerate(rows):
                    target = torch.tensor(row[1:])
                    mask = torch.tensor(sup[1:])
                    lp = logp[r, :len(row) - 1].gather(1, target[:, None])[:, 0]
                    ce_items.append(float(-(lp[mask]).mean()))
                    where = ids[r] == image_id
                    v = hs[0][r][where].double()
                    vhat = sum(w[l - 1] * hs[l][r][where].double() for l in range(1, k + 1))
                    cos_t.append(torch.nn.functional.cosine_similarity(v, vhat, dim=-1))
                    cos_k.append(torch.nn.functional.cosine_similarity(v, hs[k][r][where].double(), dim=-1))
                del out_hf, logp, hs
        out["caption_ce"] = sum(ce_items) / len(ce_items)
        out["caption_ce_items"] = ce_items
        out["cos_v_vhat"] = float(torch.cat(cos_t).mean())
        out["cos_v_hk"] = float(torch.cat(cos_k).mean())
        lens_model = HFLlava(model, tok, self.built.processor)
        lens_items = [{"image": it["scene"].image, "path": f"held-out-{i}", "labels": it["labels"]}
                      for i, it in enumerate(self.items[:self.p.lens_scenes])]
        lens = run_lens(lens_model, lens_items, [0, k], prompt=IMAGE_TOKEN, progress=False)
        out["lens"] = {key: {name: lens["metrics"][key].get(name) for name in
                             ("grounded", "grounded_top5", "meaningful", "distinct_per_image", "top_token_share")}
                       for key in lens["metrics"]}
        pics = []
        os.makedirs(pictures_dir, exist_ok=True)
        for i, entry in enumerate(lens["images"][:self.p.pictures]):
            path = os.path.join(pictures_dir, f"{tag}-stage{stage}-scene{i}.png")
            render_image(lens_items[i]["image"], entry, [0, k], path, title=f"{tag} stage {stage}, held-out scene {i}")
            pics.append(path)
        out["_pictures"] = pics
        del model, lens_model
        if stage == 2:
            model, tok = hf_model(self.built, torch.bfloat16)
            out.update(self._qa(model, tok, image_id, m, torch.bfloat16))
            del model
        return out

    def _qa(self, model, tok, image_id, m, dtype) -> dict:
        """Greedy answers, batched by prompt length (no padding, so no position offsets)."""
        kinds = ("color", "shape", "count", "position")
        todo = []
        for n, it in enumerate(self.items):
            for kind, (q, ref) in it["questions"].items():
                ids, sup = self._ids(D._conv([(q, ref)], True), "vicuna_v1", tok, image_id, m)
                start = sup.index(True)
                todo.append(dict(n=n, kind=kind, q=q, ref=ref, prompt=ids[:start], budget=sum(sup) + 2))
        by_len: Dict[int, list] = {}
        for t in todo:
            by_len.setdefault(len(t["prompt"]), []).append(t)
        with torch.no_grad():
            for group in by_len.values():
                for at in range(0, len(group), 8):
                    chunk = group[at:at + 8]
                    prompt = torch.tensor([t["prompt"] for t in chunk])
                    # An exact match has the reference's tokens (+ end of turn): longer answers cannot
                    # match, so generation stops there.
                    budget = min(self.p.qa_max_new_tokens, max(t["budget"] for t in chunk))
                    gen = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                         pixel_values=torch.cat([self._pixels(self.items[t["n"]]["scene"], dtype)
                                                                 for t in chunk]),
                                         do_sample=False, max_new_tokens=budget, eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.pad_token_id)
                    for t, row in zip(chunk, gen):
                        t["answer"] = tok.decode(row[prompt.shape[1]:], skip_special_tokens=True)
        items = {kind: [] for kind in kinds}
        keys = {kind: [] for kind in kinds}
        answers = []
        for t in todo:  # in item order, as every run stores them
            ok = normalise(t["answer"]) == normalise(t["ref"])
            key_ok = key_answer(t["kind"], t["answer"]) == key_answer(t["kind"], t["ref"])
            items[t["kind"]].append(int(ok))
            keys[t["kind"]].append(int(key_ok))
            answers.append({"kind": t["kind"], "question": t["q"], "reference": t["ref"], "answer": t["answer"],
                            "match": ok, "key_match": key_ok})
        return {"qa": _accuracy(items), "qa_items": items, "qa_key": _accuracy(keys), "qa_key_items": keys,
                "_answers": answers}


def _accuracy(items: Dict[str, list]) -> dict:
    acc = {kind: (sum(v) / len(v) if v else None) for kind, v in items.items()}
    flat = [x for v in items.values() for x in v]
    acc["all"] = sum(flat) / len(flat) if flat else None
    return acc


_KEY_WORDS = {
    "color": tuple(D.COLORS),
    "shape": D.SHAPES,
    "count": D.NUMBER_WORDS[1:],
    # longest first, so "top left" is not read as "top"
    "position": ("top left", "top right", "bottom left", "bottom right", "top", "bottom", "left", "right", "center"),
}
_DIGITS = {str(i): w for i, w in enumerate(D.NUMBER_WORDS)}


def key_answer(kind: str, text: str):
    """The answer's key word (VQA-style scoring): the first word of the question's kind in the text
    (a colour, a shape, a number — digits read as words —, a position phrase), or None."""
    t = " " + re.sub(r"[^a-z0-9 ]", " ", text.lower().replace("-", " ")) + " "
    if kind == "count":
        t = re.sub(r" (\d) ", lambda mt: f" {_DIGITS[mt.group(1)]} ", t)
    best = None
    for w in _KEY_WORDS[kind]:
        i = t.find(f" {w} ")
        if i >= 0 and (best is None or i < best[0]):
            best = (i, w)
    return None if best is None else best[1]


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())
