"""The test suite's shared helpers, in one place; import them as ``from tests.helpers import ...``.

- tiny transformers models built from configs with random weights (no downloads): :func:`tiny_model`
  and its thin wrappers :func:`tiny_llama`, :func:`tiny_gpt2`, :func:`tiny_bert`; random token
  :func:`batches`; :func:`kernel_devices`, where the Triton kernels run in this session;
- PEFT AdaLoRA models trained in tests (peft is imported inside the helpers, only when called);
- helpers that several test modules share: the regulariser's factors and float64 reference, op
  counting, and the small models and loops of the allocator, non-finite, merge and checkpoint tests.

The max-relative-error helper is :func:`adalora_fast.testing.max_rel_err`. Fixtures and the
``TRITON_INTERPRET`` default live in ``conftest.py``.
"""

from __future__ import annotations

import copy
import os
from collections import Counter

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import adalora_fast as af
from adalora_fast import reference
from adalora_fast.allocator import FlatScorer, RankAllocator, ReferenceScorer
from adalora_fast.factors import FACTORS
from adalora_fast.layer import SVDLinear
from adalora_fast.testing import random_llama

LLAMA_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KINDS = FACTORS  # the factor names, from the package

# ---- tiny models, batches, devices --------------------------------------------------------------------
# arch -> (config class, model class, config defaults): 2 layers, hidden 32, vocab 64.
_TINY = {
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0),
    ),
    "bert": (
        "BertConfig",
        "BertModel",
        dict(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            max_position_embeddings=32,
        ),
    ),
    "bert-cls": (
        "BertConfig",
        "BertForSequenceClassification",
        dict(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            max_position_embeddings=32,
            num_labels=3,
        ),
    ),  # fmt: skip
    "deberta-v2": (
        "DebertaV2Config",
        "DebertaV2ForSequenceClassification",
        dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48),
    ),
    "t5": (
        "T5Config",
        "T5ForConditionalGeneration",
        dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, decoder_start_token_id=0),
    ),
}


def tiny_model(arch: str, seed: int = 0, **config) -> nn.Module:
    """A tiny ``arch`` ("gpt2", "bert", "deberta-v2", "t5"; Llama: :func:`tiny_llama`) model in eval mode,
    built from its config (``config`` overrides the defaults) with random weights drawn after
    ``torch.manual_seed(seed)``."""
    import transformers

    config_cls, model_cls, defaults = _TINY[arch]
    torch.manual_seed(seed)
    cfg = getattr(transformers, config_cls)(**{**defaults, **config})
    extra = {"add_pooling_layer": True} if arch == "bert" else {}
    return getattr(transformers, model_cls)(cfg, **extra).eval()


def tiny_llama(num_layers: int = 2, hidden: int = 32, intermediate: int = 48, vocab: int = 64, seed: int = 0):
    """The package's random Llama (``adalora_fast.testing.random_llama``) in eval mode."""
    return random_llama(num_layers, hidden, intermediate, vocab, seed).eval()


def tiny_gpt2(num_layers: int = 2, seed: int = 0):
    return tiny_model("gpt2", seed, n_layer=num_layers)


def tiny_bert(seed: int = 0):
    return tiny_model("bert", seed)


def batches(n: int, vocab: int = 64, batch: int = 2, seq: int = 9, seed: int = 1234):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(n)]


def kernel_devices() -> list[str]:
    """Where the Triton kernels run in this session: the interpreter's CPU, or CUDA when compiled."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return ["cpu"]
    return ["cuda"] if torch.cuda.is_available() else []


# ---- PEFT AdaLoRA models trained in tests (interop: checkpoints and live conversion) -------------------
def peft_adalora(base, targets, seed: int = 1, **config):
    """``peft.get_peft_model`` with AdaLoRA on ``targets`` and non-zero singular values, so the adapters
    change the outputs from step 0."""
    import peft

    torch.manual_seed(seed)
    pm = peft.get_peft_model(base, peft.AdaLoraConfig(target_modules=targets, **config))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_E" in n:
                p.normal_(0, 0.5)
    return pm


def train_peft(pm, optimizer, steps: range, seed: int = 1234) -> None:
    """PEFT's documented loop for ``steps`` (0-based optimizer steps), on the shared random batches."""
    data = batches(steps.stop, seed=seed)
    for step in steps:
        x = data[step]
        pm(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        pm.base_model.update_and_allocate(step)
        optimizer.zero_grad()


def peft_pattern(pm) -> dict[str, list[bool]] | None:
    """PEFT's current rank pattern in our form (module -> kept flags); None before the first mask."""
    from adalora_fast.checkpoint.peft_format import parse_rank_pattern

    return parse_rank_pattern(pm.peft_config["default"].rank_pattern, "default")


def train_side_by_side(pm, ours, opt_p, opt_o, data, steps: range, seed_dropout: bool = False) -> int:
    """PEFT's model and ours trained in lockstep for ``steps``: equal losses at every step and, from the
    first mask step on, equal rank patterns. ``data[step]`` is a token batch (its own labels) or a dict
    of model inputs; ``seed_dropout`` seeds torch's RNG before each forward (base models with dropout).
    Returns how many steps had a mask."""
    mask_steps = 0
    for step in steps:
        inputs = (
            data[step] if isinstance(data[step], dict) else {"input_ids": data[step], "labels": data[step]}
        )
        if seed_dropout:
            torch.manual_seed(step)
        loss_p = pm(**inputs).loss
        if seed_dropout:
            torch.manual_seed(step)
        loss_o = ours(**inputs).loss
        torch.testing.assert_close(loss_o, loss_p, rtol=1e-5, atol=0, msg=f"loss differs at step {step}")
        loss_p.backward()
        loss_o.backward()
        opt_p.step()
        opt_o.step()
        pm.base_model.update_and_allocate(step)
        ours.update_and_allocate(step)
        expected = peft_pattern(pm)
        if expected is not None:
            mask_steps += 1
            assert ours.rank_pattern == expected, f"rank pattern differs at step {step}"
        opt_p.zero_grad()
        opt_o.zero_grad()
    return mask_steps


def fix_pattern_with_module_at_rank_zero(pm, module: str) -> None:
    """Run PEFT's own final mask step (``total_step - tfinal``) with ``module``'s importance EMAs zeroed,
    so that PEFT's allocator masks every rank of it (its triplet scores are the smallest)."""
    alloc = pm.base_model.rankallocator
    for key in list(alloc.exp_avg_ipt):
        if key.startswith(f"{module}.lora_"):
            alloc.exp_avg_ipt[key].zero_()
            alloc.exp_avg_unc[key].zero_()
    cfg = pm.peft_config["default"]
    # PEFT's final step masks with the scores as they are (no EMA update at that step).
    pm.base_model.update_and_allocate(cfg.total_step - cfg.tfinal)
    pattern = cfg.rank_pattern
    key = next(k for k in pattern if k.startswith(f"{module}.lora_E"))
    assert not any(pattern[key]), "the module was meant to end at rank 0"
    assert any(any(v) for v in pattern.values())


# ---- the orthogonal regulariser's factors and float64 reference (tests/test_functional.py,
# tests/test_model.py, tests/kernels/test_orth_defect.py) ----------------------------------------------
# (r, d_in, d_out) per layer: several shapes, repeated shapes (batched groups), rank-0 layers.
MIXED = [
    (12, 32, 32),
    (12, 32, 16),
    (12, 32, 32),
    (3, 7, 5),
    (12, 48, 32),
    (0, 33, 17),
    (12, 32, 16),
    (1, 33, 1),
    (3, 7, 5),
    (0, 7, 5),
    (5, 3, 40),  # r > d_in: A A^T cannot be the identity
]


def random_factors(shapes, seed, scale=0.3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    As = [(torch.randn(r, d_in, generator=g) * scale).to(dtype) for r, d_in, _ in shapes]
    Bs = [(torch.randn(d_out, r, generator=g) * scale).to(dtype) for r, _, d_out in shapes]
    return As, Bs


def float64_value_and_grads(As, Bs):
    A64 = [a.detach().double().requires_grad_() for a in As]
    B64 = [b.detach().double().requires_grad_() for b in Bs]
    value = reference.orth_regularization(A64, B64)
    grads = torch.autograd.grad(value, A64 + B64, allow_unused=True)
    return value.detach(), grads


def orthonormal_factors(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    As, Bs = [], []
    for r, d_in, d_out in shapes:
        qa, _ = torch.linalg.qr(torch.randn(d_in, r, generator=g, dtype=torch.float64))
        qb, _ = torch.linalg.qr(torch.randn(d_out, r, generator=g, dtype=torch.float64))
        As.append(qa.T.contiguous().float())  # r x d_in, orthonormal rows
        Bs.append(qb.float())  # d_out x r, orthonormal columns
    return As, Bs


# ---- op counts (tests/allocator/, tests/test_functional.py) --------------------------------------------
HOST_SYNC_OPS = {"aten::item", "aten::_local_scalar_dense"}
# Zero-copy view ops: they launch no kernel. The CPU implementation of a large torch.cat makes one
# internal view per input (on CUDA it is one kernel), and the regulariser's backward must hand each
# parameter its own gradient tensor, which costs one view per parameter (autograd then accumulates
# each .grad itself). Everything else -- every op that computes or copies -- must not grow with depth.
VIEW_OPS = {
    "aten::as_strided", "aten::narrow", "aten::slice", "aten::view", "aten::transpose", "aten::unsqueeze",
    "aten::t", "aten::alias", "aten::expand", "aten::select", "aten::reshape", "aten::_reshape_alias",
    "aten::squeeze", "aten::permute", "aten::split", "aten::split_with_sizes", "aten::unbind",
    "aten::detach", "aten::resolve_conj", "aten::resolve_neg",
}  # fmt: skip


def _under_accumulate_grad(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if "AccumulateGrad" in parent.name:
            return True
        parent = parent.cpu_parent
    return False


def aten_ops(fn) -> Counter:
    """The aten ops ``fn()`` runs (CPU profiler), not counting those under autograd's AccumulateGrad."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return Counter(
        e.name for e in prof.events() if e.name.startswith("aten::") and not _under_accumulate_grad(e)
    )


# ---- the allocator's model and random gradients (tests/allocator/, tests/test_functional.py) -----------
def allocator_model(num_layers=2, seed=0, hidden=32, intermediate=48, **cfg):
    """A tiny Llama adapted on all 7 projections (init_r 5, target_r 2, total_step 50 unless ``cfg``
    says otherwise) with random non-zero singular values."""
    cfg = {"init_r": 5, "target_r": 2, "total_step": 50, "target_modules": LLAMA_PROJ, **cfg}
    base = tiny_llama(num_layers, hidden=hidden, intermediate=intermediate, seed=seed)
    m = af.get_adalora_model(base, af.AdaLoraConfig(**cfg))
    with torch.no_grad():
        for _, layer in m.adapted_layers:
            layer.lora_E.normal_()
    return m


def random_grads(model, gen):
    """Fresh random ``.grad`` for every adapter parameter of ``model``."""
    for _, layer in model.adapted_layers:
        for k in ("lora_A", "lora_E", "lora_B"):
            p = getattr(layer, k)
            p.grad = torch.randn(p.shape, generator=gen)


# ---- non-finite gradients (tests/allocator/, tests/checkpoint/test_training_state.py,
# tests/integration/test_training_loops.py) -------------------------------------------------------------
# Mask steps: step > tinit and step % deltaT == 0 -> 3, 6, 9, 12, ...; final step 35.
NONFINITE_SCHEDULE = {"init_r": 5, "target_r": 2, "tinit": 2, "tfinal": 5, "deltaT": 3, "total_step": 40}
SCORER_BACKENDS = ["torch", "reference"]


def scored_model(backend, seed=0, **cfg):
    """A tiny Llama under NONFINITE_SCHEDULE whose allocator scores with ``backend`` ("torch": the flat
    scorer, "reference": the per-layer one), with random non-zero singular values."""
    base = tiny_llama(2, seed=seed)
    config = af.AdaLoraConfig(target_modules=LLAMA_PROJ, backend="torch", **{**NONFINITE_SCHEDULE, **cfg})
    model = af.get_adalora_model(base, config)
    with torch.no_grad():
        for _, layer in model.adapted_layers:
            layer.lora_E.normal_()
    if backend == "reference":
        model.rank_allocator = RankAllocator(model.adapted_layers, config, backend="reference")
    expected = ReferenceScorer if backend == "reference" else FlatScorer
    assert type(model.rank_allocator.scorer) is expected
    return model


def draw_grads(model, gen):
    """Fresh random gradients for every adapter parameter (a list, to give twins the same ones)."""
    out = []
    for _, layer in model.adapted_layers:
        for k in KINDS:
            out.append(torch.randn(getattr(layer, k).shape, generator=gen))
    return out


def set_grads(model, grads):
    it = iter(grads)
    for _, layer in model.adapted_layers:
        for k in KINDS:
            getattr(layer, k).grad = next(it).clone()


def poisoned(model, grads, where, value):
    """A copy of ``grads`` with one non-finite element in layer 3's ``where`` gradient."""
    grads = [g.clone() for g in grads]
    index = 3 * 3 + KINDS.index(where)
    grads[index].view(-1)[1] = value
    return grads


def allocator_state(model):
    """Everything the allocator owns or writes: EMAs, keep masks, E values (cloned)."""
    alloc = model.rank_allocator
    out = {f"ema.{k}": v.clone() for k, v in alloc.scorer.layer_state().items()}
    out.update({f"keep.{k}": v.clone() for k, v in alloc.keep_mask().items()})
    for name, layer in model.adapted_layers:
        for k in KINDS:
            out[f"{name}.{k}"] = getattr(layer, k).detach().clone()
    return out


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        assert torch.isfinite(a[key].float()).all(), key


def run_scored_steps(model, steps, gen_or_grads):
    for step in steps:
        grads = draw_grads(model, gen_or_grads)
        set_grads(model, grads)
        model.update_and_allocate(step)


# ---- a model trained through the whole schedule (tests/test_model.py, tests/checkpoint/) ---------------
TRAINED_SCHEDULE = {"init_r": 4, "target_r": 1, "tinit": 2, "tfinal": 3, "deltaT": 1, "total_step": 12}


def trained_model(base: nn.Module, targets: list[str], seed: int = 0) -> af.AdaLoraModel:
    """A model trained through the whole schedule (mask steps, final pattern), one layer forced to rank 0."""
    torch.manual_seed(seed)
    cfg = af.AdaLoraConfig(target_modules=targets, backend="torch", lora_dropout=0.0, **TRAINED_SCHEDULE)
    model = af.get_adalora_model(copy.deepcopy(base), cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    data = batches(TRAINED_SCHEDULE["total_step"], seed=seed + 1)
    for step, x in enumerate(data):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        model.update_and_allocate(step)
        opt.zero_grad()
    with torch.no_grad():  # one layer pruned to rank 0 (as a budget can leave it)
        first = model.adapted_layers[0][1]
        first.lora_E.zero_()
    kept = model.kept_ranks()
    assert min(kept.values()) < TRAINED_SCHEDULE["init_r"], "the schedule should have pruned something"
    return model


# ---- checkpoints (tests/checkpoint/, tests/test_model.py) ----------------------------------------------
CHECKPOINT_SCHEDULE = {"init_r": 4, "target_r": 2, "tinit": 3, "tfinal": 5, "deltaT": 2, "total_step": 30}


def train_loop(model, opt, steps, data):
    """The documented loop over ``steps``: forward, backward, ``opt.step()``, the allocator, zero_grad."""
    for step in steps:
        x = data[step]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        model.update_and_allocate(step)
        opt.zero_grad()


def trainable_params(model):
    return [p for p in model.parameters() if p.requires_grad]


def checkpoint_model(base, **cfg):
    """``base`` adapted on the 7 Llama projections under CHECKPOINT_SCHEDULE (``cfg`` overrides)."""
    return af.get_adalora_model(
        base, af.AdaLoraConfig(target_modules=LLAMA_PROJ, **{**CHECKPOINT_SCHEDULE, **cfg})
    )


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def trained_with_a_rank0_layer(base):
    """``checkpoint_model(base)`` trained 12 steps, then its second adapted layer forced to rank 0."""
    model = checkpoint_model(base)
    opt = torch.optim.AdamW(trainable_params(model), lr=1e-2)
    train_loop(model, opt, range(12), batches(12))
    # Force one layer to rank 0 (as the allocator may do) to exercise empty tensors.
    keep = model.rank_allocator.keep_mask()
    keep = {n: k.clone() for n, k in keep.items()}
    keep[model.adapted_names[1]][:] = False
    model.rank_allocator.scorer.set_keep(keep)
    model.rank_allocator.scorer.apply_keep()
    return model


def is_untouched(model: nn.Module) -> bool:
    """No module of ``model`` was replaced by an adapter (a refused load left it as it was)."""
    return not any(isinstance(m, SVDLinear) for m in model.modules())


# ---- a tokenizer made here (no downloads), for TRL's trainers ------------------------------------------
def word_tokenizer(vocab: int = 64):
    """A word-level fast tokenizer over ``<pad> <eos> <unk> w0 ... w{vocab-4}`` (ids 0, 1, 2, 3...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(vocab - 3)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = dict(pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def word_texts(n: int, length: int = 12, vocab: int = 64, seed: int = 0) -> list[str]:
    """``n`` random sentences of :func:`word_tokenizer`'s words."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, vocab - 3, (n, length), generator=g)
    return [" ".join(f"w{int(i)}" for i in row) for row in rows]


# ---- several processes on the CPU (tests/integration/test_ddp.py, test_fsdp_*.py) --------------------
# A test launches its own file as a script, once per rank (``python FILE SCENARIO RANK STORE OUT``, the
# repository root on PYTHONPATH so that the script imports tests.helpers), with a FileStore rendezvous in
# tmp_path (no port to pick, so no port race), a timeout on every collective and a wall-clock limit on
# the whole launch, so that a stuck rank fails the test instead of hanging it.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def init_gloo(rank: int, world: int, store: str, timeout_s: float = 60.0) -> None:
    """One rank's ``init_process_group`` (gloo, one thread) over the FileStore ``store``."""
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )  # fmt: skip


def launch_ranks(script: str, scenario: str, tmp_path, world: int = 2, timeout_s: float = 240.0) -> None:
    """Run ``script scenario RANK STORE tmp_path`` on ``world`` processes; ``pytest.fail`` with their
    output if a rank fails or the launch outlives ``timeout_s``."""
    import subprocess
    import sys
    import time

    import pytest

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])
    store = tmp_path / f"{scenario}.store"
    logs = [tmp_path / f"{scenario}_rank{r}.log" for r in range(world)]
    procs = []
    for r in range(world):
        with open(logs[r], "w") as log:
            cmd = [sys.executable, script, scenario, str(r), str(store), str(tmp_path)]
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    if codes != [0] * world:
        output = "\n".join(
            f"--- rank {r} (exit {c}) ---\n{logs[r].read_text()[-4000:]}" for r, c in enumerate(codes)
        )
        pytest.fail(f"{scenario}: ranks exited with {codes} (negative: killed after {timeout_s} s)\n{output}")
