"""Megatron-core side of nemo_basic: layer specs, decoder instrumentation, NeVA subclasses."""
