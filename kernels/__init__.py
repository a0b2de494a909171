"""Triton kernels of adalora_fast, installed as ``adalora_fast.kernels``.

One file per fused operation, named after its math; tensors in, tensors out, no module state.
The kernels plug into the dispatch points of :mod:`adalora_fast.dispatch` (backend "triton").
"""
