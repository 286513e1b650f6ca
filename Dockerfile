# nemo_basic on NVIDIA's NGC NeMo container (GPU: Transformer Engine, apex, NCCL come with it).
# nvcr.io/nvidia/nemo:25.11 is the last container line that still carries NeMo 2's
# nemo.collections.vlm (NeVA) with megatron-core 0.15.x; later ones move to Megatron-Bridge.
ARG BASE_IMAGE=nvcr.io/nvidia/nemo:25.11
FROM ${BASE_IMAGE}
WORKDIR /opt/nemo_basic
COPY . .
# --no-deps keeps the container's torch, TE, apex and NeMo; only the package itself is added.
RUN pip install --no-cache-dir --no-deps -e . && python -c "import nemo_basic"
