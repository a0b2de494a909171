"""Triton kernels of adalora_fast, installed as ``adalora_fast.kernels``.

One file per fused operation, named after its math; tensors in, tensors out, no module state; they
import nothing of the package. Each host entry point checks its inputs with errors that name the
tensor, and each operation's module has ``unsupported_reason(...) -> str | None``: why a
well-formed call cannot run here (the op layer, :mod:`adalora_fast.functional`, then runs PyTorch).

Index (file: what it computes; who calls it):

- ``x_at.py``: ``S = drop(X) A^T`` (fp32, M x r); ``svd_linear`` (forward shrink ``S = drop(x) Q^T``,
  backward ``G = dy P``).
- ``xw_plus_sb.py``: ``Y = X W + b + drop(S diag(s λ) B)``, the base GEMM with the low-rank term in its
  accumulator; ``svd_linear`` (forward ``y``, backward ``dx``, inference with S computed inside).
- ``xw_plus_sb_tma.py``: the same ``Y`` as a persistent GEMM fed and stored by TMA tensor descriptors
  (fp16 / bf16, sm_90); ``svd_linear`` (forward ``y``, backward ``dx``) with
  ``ADALORA_FAST_TMA_GEMM=1`` (opt-in until a GPU run shows it faster).
- ``xt_s.py``: ``diag(s λ) S^T drop(X)``, row-split partials summed in a fixed order, stored in the
  factor's dtype and layout; with d(λ) reduced in the same launch (``ADALORA_FAST_FOLD_DLAMBDA=1``,
  opt-in); ``svd_linear`` (``dQ`` from x, ``dP`` from dy).
- ``y_plus_sb.py``: ``Y += drop(S diag(s λ) B)`` in place, the low-rank term added into an output another
  kernel made; ``base_plus_svd`` (forward ``y``, backward ``dx``).
- ``base_plus_svd.py``: the adapted layer on a base whose product another library computes
  (bitsandbytes' 4/8-bit): ``x_at``, ``y_plus_sb``, ``xt_s`` under one autograd Function;
  ``adalora_fast.functional.svd_linear`` with ``backend="triton"`` on a quantised base (opt-in), and on
  a floating-point base after ``F.linear`` with ``ADALORA_FAST_CUBLAS_GEMM=1`` (opt-in).
- ``dropout_mask.py``: the Philox keep mask of a seed, materialised; tests and references only.
- ``svd_linear.py``: the ``torch.library`` ops ``adalora_fast::svd_linear_fwd / _bwd / _infer`` (fake
  implementations, autograd) on the three kernels above; ``adalora_fast.functional.svd_linear``.
- ``importance_ema.py``: the score EMAs ``Ibar, U`` of every element of every A, E, B and the triplet
  scores, through pointer tables, in 3 launches; ``adalora_fast.allocator.triton_scorer``.
- ``orth_defect.py``: ``R = mean ||X X^T - I||_F`` over all factors, 2 launches forward and 1 backward;
  ``adalora_fast.functional.orth_regularization``.
- ``_common.py``: jit helpers (Philox dropout bits, ``λ s`` on the device, the TF32-split dots) and
  launch metadata; ``constants.py``: ``RANKNUM_EPS``, ``SUPPORTED_DTYPES``, ``MAX_RANK`` (no Triton
  import: the package reads them too).

The numbers they follow: ``docs/numeric_contract.md``.
"""
