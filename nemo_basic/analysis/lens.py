"""The visual logit lens on a Hugging Face ``LlavaForConditionalGeneration`` (and, through the HF
export, on our NeMo checkpoints).

Layer 0 is the projector output V (the initial visual embeddings); layer l >= 1 is the hidden state
after decoder layer l (before the final norm), at the image positions, with the prompt's text around
the image (causal attention: only the text before the image changes them). Each is mapped to its
nearest tokens by cosine in the LLM's input embedding table E over the true vocabulary
(:mod:`nemo_basic.analysis.nearest`); :mod:`nemo_basic.analysis.metrics` scores them.

The prompt is text with one ``<image>`` marker, tokenised as the data pipeline does (each side on
its own, the tokenizer's BOS first when it adds one); the default ``"<image>"`` is the stage-1
(``plain`` template) caption prompt: the image, then the caption the model would write.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from nemo_basic.analysis import metrics as M
from nemo_basic.analysis.nearest import TokenTable, valid_rows

IMAGE_MARKER = "<image>"
DEFAULT_PROMPT = IMAGE_MARKER
TOP_K = 5


class AnalysisError(ValueError):
    """Bad input to an analysis; the message names the file, key or value."""


class _Stop(Exception):
    pass


def _decoder_layers(lm) -> torch.nn.ModuleList:
    layers = getattr(lm, "layers", None)
    if layers is None and hasattr(lm, "model"):
        layers = getattr(lm.model, "layers", None)
    if layers is None:
        raise AnalysisError(f"cannot find the decoder layers of {type(lm).__name__}")
    return layers


class HFLlava:
    """A loaded HF LLaVA with what the lens and the probe need (float32 on CPU by default)."""

    def __init__(self, model, tokenizer, image_processor, source: str = ""):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.processor = image_processor
        self.source = source
        self.config = model.config
        self.lm = model.model.language_model if hasattr(model, "model") else model.language_model
        self.layers = _decoder_layers(self.lm)
        self.depth = len(self.layers)
        self.image_token_index = int(self.config.image_token_index)
        self._texts: Dict[int, str] = {}
        self._table: Optional[TokenTable] = None

    # -- loading ----------------------------------------------------------------------------------
    @classmethod
    def load(cls, hf_dir: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu") -> "HFLlava":
        from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

        hf_dir = Path(hf_dir)
        cfg_path = hf_dir / "config.json"
        if not cfg_path.is_file():
            raise AnalysisError(f"{hf_dir} is not a Hugging Face model directory: no config.json")
        raw = json.loads(cfg_path.read_text())
        if raw.get("model_type") != "llava" or "vision_config" not in raw:
            raise AnalysisError(f"{cfg_path}: model_type={raw.get('model_type')!r} has no vision tower; the lens needs "
                                "a LlavaForConditionalGeneration (vision encoder + projector + LLM)")
        if not (hf_dir / "preprocessor_config.json").is_file():
            raise AnalysisError(f"{hf_dir} has no preprocessor_config.json (the image processor)")
        model = LlavaForConditionalGeneration.from_pretrained(str(hf_dir), dtype=dtype, local_files_only=True,
                                                              attn_implementation="eager")
        model = model.to(device)
        tokenizer = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
        processor = AutoImageProcessor.from_pretrained(str(hf_dir), local_files_only=True)
        return cls(model, tokenizer, processor, source=str(hf_dir))

    # -- geometry ---------------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        from nemo_basic.models.vision import processor_image_size

        size = processor_image_size(self.processor)
        return int(size or self.config.vision_config.image_size)

    def check_layers(self, layers: Sequence[int]) -> List[int]:
        out = []
        for l in layers:
            if not isinstance(l, int) or l < 0 or l > self.depth:
                raise AnalysisError(f"layer {l!r} is beyond the model's depth: {self.source or 'the model'} has "
                                    f"{self.depth} decoder layers, so layers are 0 (projector output) .. {self.depth}")
            if l not in out:
                out.append(l)
        return out

    # -- vocabulary -------------------------------------------------------------------------------
    def table(self) -> TokenTable:
        if self._table is None:
            E = self.model.get_input_embeddings().weight
            valid = valid_rows(E.shape[0], min(len(self.tokenizer), E.shape[0]), exclude=[self.image_token_index])
            self._table = TokenTable(E, valid)
        return self._table

    def text(self, token_id: int) -> str:
        t = self._texts.get(token_id)
        if t is None:
            t = self.tokenizer.decode([int(token_id)])
            self._texts[token_id] = t
        return t

    # -- forward pieces ---------------------------------------------------------------------------
    def pixels(self, image) -> torch.Tensor:
        out = self.processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"]
        return out.to(device=self.model.device, dtype=self.model.dtype)

    def visual_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """V [m, d]: the projector output of one image."""
        with torch.no_grad():
            feats = self.model.get_image_features(
                pixel_values=pixel_values, vision_feature_layer=self.config.vision_feature_layer,
                vision_feature_select_strategy=self.config.vision_feature_select_strategy)
        return feats[0]  # a list (one [m, d] per image) or a [1, m, d] tensor

    def prompt_ids(self, prompt: str, num_image_tokens: int) -> tuple[list, int]:
        """Token ids of ``prompt`` with ``num_image_tokens`` image placeholders at its marker, and the
        position of the first placeholder."""
        if prompt.count(IMAGE_MARKER) != 1:
            raise AnalysisError(f"--prompt {prompt!r} must contain the marker {IMAGE_MARKER!r} exactly once")
        before, after = prompt.split(IMAGE_MARKER)
        tok = self.tokenizer
        enc = lambda s: tok(s, add_special_tokens=False)["input_ids"] if s else []  # noqa: E731
        ids = []
        bos = tok.bos_token_id
        probe = tok("a")["input_ids"]
        if bos is not None and probe and probe[0] == bos:
            ids.append(bos)
        ids += enc(before)
        start = len(ids)
        ids += [self.image_token_index] * num_image_tokens + enc(after)
        return ids, start

    def embeddings(self, ids: list, start: int, v: torch.Tensor) -> torch.Tensor:
        """inputs_embeds [1, S, d]: E[ids] with V at the image positions."""
        E = self.model.get_input_embeddings().weight
        x = E[torch.tensor(ids, device=E.device)].detach().clone()
        x[start:start + v.shape[0]] = v.to(x.dtype)
        return x.unsqueeze(0)

    def hidden_states(self, v: torch.Tensor, prompt: str, layers: Sequence[int]) -> Dict[int, torch.Tensor]:
        """{layer: [m, d]} at the image positions (layer 0 = V)."""
        layers = self.check_layers(list(layers))
        m = v.shape[0]
        ids, start = self.prompt_ids(prompt, m)
        out = {0: v.detach()} if 0 in layers else {}
        deep = [l for l in layers if l >= 1]
        if not deep:
            return out
        last = max(deep)
        handles = []

        def hook(l):
            def fn(module, args, output):
                h = output[0] if isinstance(output, (tuple, list)) else output
                if l in deep:
                    out[l] = h[0, start:start + m].detach().clone()
                if l == last:
                    raise _Stop()
            return fn

        for l in range(1, last + 1):
            handles.append(self.layers[l - 1].register_forward_hook(hook(l)))
        try:
            with torch.no_grad():
                self.lm(inputs_embeds=self.embeddings(ids, start, v), use_cache=False)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        return out


def _grid_of(m: int) -> list:
    side = int(round(m ** 0.5))
    return [side, side] if side * side == m else [1, m]


def load_labels(path: str | os.PathLike, images: Sequence[str]) -> list:
    """Per-image per-patch labels from a JSON file, aligned with ``images``.

    Accepted: a list with one entry per image (each: a row-major list of per-patch labels -- null,
    a word, or a list of words -- or null for an unlabelled image); ``{"images": {path: [...]}}``
    (keys: the paths as given, or their file names); or the embedded data set's ``labels.json``
    (``{"scenes": {rel: scene}}``, matched by the end of the image path)."""
    from nemo_basic.analysis.scenes import scene_patch_labels

    path = Path(path)
    if not path.is_file():
        raise AnalysisError(f"--labels {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AnalysisError(f"--labels {path} is not valid JSON: {e}") from None
    if isinstance(data, list):
        if len(data) != len(images):
            raise AnalysisError(f"--labels {path} has {len(data)} entries but {len(images)} images were given; "
                                "give one entry (a per-patch list, or null) per image, in the same order")
        return data

    def lookup(table: dict, img: str):
        norm = str(img).replace(os.sep, "/")
        for key, value in table.items():
            if key == img or norm.endswith("/" + key.lstrip("/")) or os.path.basename(key) == os.path.basename(img):
                return value
        return None

    if isinstance(data, dict) and isinstance(data.get("images"), dict):
        found = [lookup(data["images"], img) for img in images]
    elif isinstance(data, dict) and isinstance(data.get("scenes"), dict):
        found = []
        for img in images:
            scene = lookup(data["scenes"], img)
            found.append(None if scene is None else scene_patch_labels(scene))
    else:
        raise AnalysisError(f"--labels {path}: expected a list (one entry per image), {{\"images\": {{path: "
                            "[...]}}}} or the embedded data's labels.json ({\"scenes\": ...})")
    missing = [img for img, f in zip(images, found) if f is None]
    if len(missing) == len(images):
        raise AnalysisError(f"--labels {path} has labels for none of the {len(images)} images (e.g. {images[0]})")
    return found


def run_lens(model: HFLlava, items: Sequence[dict], layers: Sequence[int], prompt: str = DEFAULT_PROMPT,
             k: int = TOP_K, progress: bool = True) -> dict:
    """The lens over ``items`` (``[{"image": PIL image, "path": str, "labels": list or None}]``).

    Returns the ``lens.json`` structure: ``layers``, ``images`` (grid, per-layer token ids and texts,
    top-k ids, labels) and per-layer ``metrics``."""
    from tqdm.auto import tqdm

    layers = model.check_layers(list(layers))
    table = model.table()
    images = []
    per_layer = {l: [] for l in layers}
    for item in tqdm(items, desc="lens", unit="image", disable=not progress):
        v = model.visual_embeddings(model.pixels(item["image"]))
        m = v.shape[0]
        labels = item.get("labels")
        if labels is not None and len(labels) != m:
            raise AnalysisError(f"the labels of {item.get('path')} have {len(labels)} patches but the model sees "
                                f"{m} ({'x'.join(map(str, _grid_of(m)))})")
        hidden = model.hidden_states(v, prompt, layers)
        entry = {"image": item.get("path"), "grid": _grid_of(m), "token_ids": {}, "tokens": {}, "top5_ids": {},
                 "top5_cos": {}, "labels": labels if labels is not None else [None] * m}
        for l in layers:
            ids, cos = table.topk(hidden[l], k)
            key = str(l)
            entry["token_ids"][key] = ids[:, 0].tolist()
            entry["tokens"][key] = [model.text(i) for i in entry["token_ids"][key]]
            entry["top5_ids"][key] = ids.tolist()
            entry["top5_cos"][key] = [[round(float(c), 6) for c in row] for row in cos]
            top5 = [[model.text(i) for i in row] for row in entry["top5_ids"][key]]
            per_layer[l].append(M.image_metrics(entry["tokens"][key], labels, top5, ids=entry["token_ids"][key]))
        entry["grounded_patches"] = {str(l): [bool(lab is not None and M.names(t, lab))
                                              for t, lab in zip(entry["tokens"][str(l)], labels or [None] * m)]
                                     for l in layers}
        images.append(entry)
    return {"layers": layers, "images": images, "metrics": {str(l): M.combine(per_layer[l]) for l in layers},
            "prompt": prompt, "model": model.source, "depth": model.depth}


__all__ = ["AnalysisError", "DEFAULT_PROMPT", "HFLlava", "IMAGE_MARKER", "load_labels", "run_lens"]
