"""The replacement probe (METHOD.md): replace every initial visual embedding (the projector output
V) by the input embedding of its nearest token, and let the LLM describe the image. For each image
the greedy continuation of the prompt from the real embeddings and from the nearest-token
embeddings, side by side: when the two agree, the projector's output already "speaks" in tokens."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from nemo_basic.analysis.lens import DEFAULT_PROMPT, HFLlava


def greedy(model: HFLlava, embeds: torch.Tensor, max_new_tokens: int) -> list:
    """Greedy decoding from ``inputs_embeds`` [1, S, d] with the KV cache; stops at EOS."""
    eos = model.tokenizer.eos_token_id
    gen_eos = getattr(getattr(model.model, "generation_config", None), "eos_token_id", None)
    stops = set([eos] if eos is not None else [])
    stops.update(gen_eos if isinstance(gen_eos, (list, tuple)) else ([gen_eos] if gen_eos is not None else []))
    out = []
    with torch.no_grad():
        res = model.model(inputs_embeds=embeds, use_cache=True)
        for _ in range(max_new_tokens):
            nxt = int(res.logits[0, -1].argmax())
            out.append(nxt)
            if nxt in stops:
                break
            res = model.model(input_ids=torch.tensor([[nxt]], device=embeds.device), past_key_values=res.past_key_values,
                              use_cache=True)
    return out


def run_probe(model: HFLlava, items: Sequence[dict], prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 24,
              progress: bool = True, say=print) -> dict:
    """``{"prompt", "images": [{"image", "real", "replaced", "real_ids", "replaced_ids", "nearest_ids"}]}``."""
    from tqdm.auto import tqdm

    table = model.table()
    results = []
    for item in tqdm(items, desc="probe", unit="image", disable=not progress):
        v = model.visual_embeddings(model.pixels(item["image"]))
        nearest = table.nearest(v)
        E = model.model.get_input_embeddings().weight
        ids, start = model.prompt_ids(prompt, v.shape[0])
        real = greedy(model, model.embeddings(ids, start, v), max_new_tokens)
        replaced = greedy(model, model.embeddings(ids, start, E[nearest.to(E.device)].detach()), max_new_tokens)
        dec = lambda t: model.tokenizer.decode(t, skip_special_tokens=True).strip()  # noqa: E731
        row = {"image": item.get("path"), "real": dec(real), "replaced": dec(replaced), "real_ids": real,
               "replaced_ids": replaced, "nearest_ids": nearest.tolist(), "same": real == replaced}
        results.append(row)
        if say is not None:
            say(f"{row['image']}: real: {row['real']!r} | nearest tokens: {row['replaced']!r}")
    agree = sum(r["same"] for r in results) / len(results) if results else None
    return {"prompt": prompt, "max_new_tokens": max_new_tokens, "model": model.source, "agreement": agree,
            "images": results}


__all__ = ["greedy", "run_probe"]
