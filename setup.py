"""nemo_basic: BASIC direct visual supervision for LLaVA-style training on NeMo 2 / Megatron-core.

Install with the verified pins:  pip install -c constraints.txt -e ".[nemo,dev]"
(`scripts/install.sh` does this in a fresh virtual environment; see README).
"""
from setuptools import find_packages, setup

CORE = [
    # The torch pin lives in constraints.txt: a bare range here would let pip pull a CUDA build
    # on machines without torch; inside the NGC container the container's torch satisfies it.
    "torch>=2.4",
    "megatron-core>=0.15,<0.17",
    "omegaconf>=2.3",
    "pydantic>=2.6,<3",  # the recipe schema (nemo_basic/recipes/schema.py)
    "webdataset>=0.2.86",
]

NEMO = [
    # NeMo 2.7.3 is the last release with nemo.collections.vlm (NeVA); what its vlm import and
    # nemo.lightning training need on top of the core. torchvision is installed --no-deps by
    # scripts/install.sh (PyPI's wheel expects a CUDA torch; nemo_basic.compat shims it).
    # Transformer Engine, apex and modelopt's kernels come with the NGC container (GPU only).
    "nemo-toolkit==2.7.3",
    "lightning>2.2.1,<=2.4.0",
    "fiddle",
    "hydra-core>1.3,<=1.3.2",
    "transformers~=4.57.0",
    "cloudpickle",
    "torchmetrics>=0.11.0",
    "nv_one_logger_core>=2.3.1",
    "nv_one_logger_training_telemetry>=2.3.1",
    "nv_one_logger_pytorch_lightning_integration>=2.3.1",
    "nvidia-resiliency-ext",
    "einops",
    "rich",
    "sentencepiece<1.0.0",
    "datasets",
    "nemo_run",
    "leptonai<0.47",
    "tiktoken",
    "tensorstore",
    "boto3",
    "qwen_vl_utils",
    "megatron-energon",
    "nvidia-modelopt",
    "peft",
]

DEV = [
    "pytest",
    "gguf",           # SmolLM2 GGUF → HF conversion (embedded default)
    "onnx",           # DINOv2 ONNX → HF conversion (embedded default)
    "onnxruntime",    # parity reference for the DINOv2 conversion
    "scikit-image",   # captioned images for the embedded data set
    "scikit-learn",
    "matplotlib",     # lens pictures, study figures
    "scipy",          # the A/B study's statistics (already pulled in by scikit-learn)
    "safetensors",
]

setup(
    name="nemo_basic",
    version="0.1.0",
    description="BASIC direct visual supervision for multimodal LLM training on NeMo 2 / Megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # nemo_basic only: research/ (the A/B study), tests/, scripts/ and examples/ are not shipped
    packages=find_packages(include=["nemo_basic", "nemo_basic.*"]),
    install_requires=CORE,
    extras_require={"nemo": NEMO, "dev": DEV},
    license="Apache-2.0",
)
