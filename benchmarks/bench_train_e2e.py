"""End-to-end training benchmark: optimizer-step throughput (tokens/s) of adalora_fast, PEFT AdaLoRA,
PEFT LoRA and the frozen model's forward + backward, on the same Llama-shaped model in one run.

The model is a ``LlamaForCausalLM`` built from a config (``harness.tiny_llama``: random weights, no
downloads, plain multi-head attention). On CUDA: 8 layers, hidden 2048, MLP 5504, vocab 32000, batch
4 x sequence 2048 (8,192 tokens per step), bf16 base weights; on the CPU: 4 layers, hidden 512,
MLP 1376, vocab 1000, batch 4 x 128, fp32 (:data:`GPU_MODEL`, :data:`CPU_MODEL`; ``--quick`` on the
CPU: 2 layers, hidden 256, MLP 688, batch 2 x 128, :data:`CPU_QUICK_MODEL`; ``--layers``, ``--hidden``,
``--intermediate``, ``--vocab``, ``--batch``, ``--seq`` override single sizes). Every provider gets
its own deep copy of the same base weights and trains on the same input ids (labels = input ids); all
7 projections of every layer are adapted. Providers:

* ``adalora_fast``: ``adalora_fast.get_adalora_model`` (backend ``--backend``, default "auto": the
  fused Triton kernels on CUDA, the PyTorch path on the CPU);
* ``peft_adalora``: PEFT's ``AdaLoraConfig`` (``task_type="CAUSAL_LM"``, so PEFT adds the orthogonal
  regulariser as ours always does), ``pm.base_model.update_and_allocate(step)``;
* ``peft_lora``: PEFT's ``LoraConfig`` at r = init_r = 12, the same lora_alpha and dropout (0), no
  allocator and no regulariser;
* ``frozen``: the base model alone, forward + backward through the activations only
  (``inputs_embeds`` requires grad, every weight frozen), no optimizer: the floor any adapter's
  training step has to pay.

The two AdaLoRA providers share every hyper-parameter (``bench_train_step_cpu.adalora_kwargs``: init_r
12, target_r 8, tinit = tfinal = 0, deltaT 1, total_step 10**6, orth_reg_weight 0.5, lora_alpha 8), so
every timed step is a mask step of the budget phase; the step counter advances on every call. Adapters
are fp32 (both libraries' default) on the bf16 base. One optimizer step = forward with labels
(``use_cache=False``), ``loss.backward()``, ``AdamW.step()`` (lr 1e-3, torch's default
implementation), ``update_and_allocate(step)`` (AdaLoRA only), ``zero_grad(set_to_none=True)``.

Timing: on the CPU the providers are timed round-robin (``harness.time_cpu_interleaved``, medians;
the per-round ratios are printed too); on CUDA each provider is timed with ``triton.testing.do_bench``
(median, ``harness.gpu_median_ms`` with at least ``--min-samples`` timed steps) after one compile /
autotune step, in ``--rounds`` rounds whose order rotates, and the median over rounds is reported.
Throughput = batch x seq / median step time. Goal on CUDA: adalora_fast >= 1.4x PEFT AdaLoRA's
throughput and >= PEFT LoRA's. Checks (a failure makes the exit code 1, the numbers are still
reported): every provider runs one untimed step first and gives finite losses; after timing, the
losses of the first steps of the two AdaLoRA providers are compared (identical models, data and
schedule: they agree to fp32 rounding on the CPU, only roughly in bf16).

Rows go to ``<out>/cpu_train_e2e.csv`` or ``<out>/gpu_train_e2e.csv`` (``harness.COLUMNS``): op
``train_e2e`` (with the shape appended when it is not the device's full preset, e.g. ``--quick`` on
the CPU), mode ``fwd+bwd+step``
(``fwd+bwd`` for frozen), d_in = hidden, d_out = MLP width, tokens = batch x seq, r = 12 (empty for
frozen), dtype of the base, median ms per step.

    python benchmarks/bench_train_e2e.py [--device cpu|cuda] [--quick] [--out DIR] [--no-csv]
    pytest benchmarks/bench_train_e2e.py --benchmark-only      # the CPU model, with pytest-benchmark

From Python (e.g. a CLI): ``bench_train_e2e.main(argv) -> int`` (exit code: 0, or 1 on failures).
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch
from bench_train_step_cpu import INIT_R, LOSS_LOG, adalora_kwargs, wrap
from harness import (
    LLAMA_PROJ,
    add_common_args,
    append_rows,
    describe_environment,
    force_compiled_triton,
    free_memory,
    gpu_median_ms,
    script_end,
    script_start,
    time_cpu_interleaved,
    tiny_llama,
)

OP = "train_e2e"
STEP_MODE, FROZEN_MODE = "fwd+bwd+step", "fwd+bwd"
PROVIDERS = ("frozen", "adalora_fast", "peft_adalora", "peft_lora")
OURS = "adalora_fast"
GPU_MODEL = {"layers": 8, "hidden": 2048, "intermediate": 5504, "vocab": 32000, "batch": 4, "seq": 2048}
CPU_MODEL = {"layers": 4, "hidden": 512, "intermediate": 1376, "vocab": 1000, "batch": 4, "seq": 128}
CPU_QUICK_MODEL = {"layers": 2, "hidden": 256, "intermediate": 688, "vocab": 1000, "batch": 2, "seq": 128}
SHAPE_KEYS = tuple(GPU_MODEL)
GPU_CSV, CPU_CSV = "gpu_train_e2e.csv", "cpu_train_e2e.csv"
# Goal on CUDA: ours >= x times the throughput of the peer.
GOALS = {"peft_adalora": 1.4, "peft_lora": 1.0}
SEED = 0
LR = 1e-3
# Loss agreement of the two AdaLoRA providers over the first steps (max |diff| of the losses).
PARITY_TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-2}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---- models and steps ---------------------------------------------------------------------------
def build_base(m: dict[str, int], device: str, dtype: torch.dtype) -> torch.nn.Module:
    """The base model of shape ``m`` (random weights from :data:`SEED`) on ``device`` in ``dtype``."""
    base = tiny_llama(
        m["layers"], m["hidden"], m["intermediate"], m["vocab"], seed=SEED,
        max_positions=max(256, m["seq"]), dtype=dtype, device=device,
    )  # fmt: skip
    return base.train()


def input_ids(m: dict[str, int], device: str, seed: int = 1234) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, m["vocab"], (m["batch"], m["seq"]), generator=g).to(device)


def adapt(base: torch.nn.Module, provider: str, backend: str = "auto") -> tuple[torch.nn.Module, Any]:
    """``(model, update_and_allocate or None)`` of an adapter provider, adapters drawn from SEED + 1."""
    if provider == OURS:
        import adalora_fast as af

        torch.manual_seed(SEED + 1)
        model = af.get_adalora_model(base, af.AdaLoraConfig(**adalora_kwargs(), backend=backend))
        return model, model.update_and_allocate
    if provider == "peft_adalora":
        return wrap(base, "peft", SEED + 1)  # PEFT AdaLoRA with the same adalora_kwargs()
    if provider == "peft_lora":
        import peft

        kw = adalora_kwargs()
        cfg = peft.LoraConfig(
            task_type="CAUSAL_LM", r=INIT_R, lora_alpha=kw["lora_alpha"], lora_dropout=kw["lora_dropout"],
            target_modules=list(LLAMA_PROJ),
        )  # fmt: skip
        torch.manual_seed(SEED + 1)
        return peft.get_peft_model(base, cfg), None
    raise ValueError(f"unknown adapter provider {provider!r}; known: {PROVIDERS[1:]}")


def count_adapted(model: torch.nn.Module) -> int:
    """Adapted modules: trainable ``lora_A`` parameters (ours, PEFT AdaLoRA's and PEFT LoRA's naming)."""
    return sum(1 for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n.split("."))


class OptimizerStep:
    """One optimizer step per call: forward with labels, backward, AdamW step, ``update_and_allocate``
    (when given), ``zero_grad``; the step counter advances on every call (from 1: with tinit = 0, step
    0 never masks, every later step of the budget phase does). The first losses are kept (detached, no
    host sync) for the parity check."""

    def __init__(self, model: torch.nn.Module, ids: torch.Tensor, update_and_allocate: Any = None) -> None:
        self.model = model.train()
        self.ids = ids
        self.update_and_allocate = update_and_allocate
        params = [p for p in model.parameters() if p.requires_grad]
        self.n_trainable = sum(p.numel() for p in params)
        self.opt = torch.optim.AdamW(params, lr=LR)
        self.step = 1
        self.losses: list[torch.Tensor] = []

    def __call__(self) -> None:
        out = self.model(input_ids=self.ids, labels=self.ids, use_cache=False)
        out.loss.backward()
        self.opt.step()
        if self.update_and_allocate is not None:
            self.update_and_allocate(self.step)
        self.opt.zero_grad(set_to_none=True)
        if len(self.losses) < LOSS_LOG:
            self.losses.append(out.loss.detach())
        self.step += 1


class FrozenStep:
    """The frozen model's forward (with labels) + backward through the activations only: every weight
    frozen, ``inputs_embeds`` (the embedding of the same ids, computed once) requires grad."""

    def __init__(self, base: torch.nn.Module, ids: torch.Tensor) -> None:
        self.model = base.train().requires_grad_(False)
        self.ids = ids
        with torch.no_grad():
            self.embeds = self.model.get_input_embeddings()(ids)
        self.n_trainable = 0
        self.losses: list[torch.Tensor] = []

    def __call__(self) -> None:
        embeds = self.embeds.detach().requires_grad_(True)
        out = self.model(inputs_embeds=embeds, labels=self.ids, use_cache=False)
        out.loss.backward()
        if len(self.losses) < LOSS_LOG:
            self.losses.append(out.loss.detach())


def make_step(
    provider: str, base: torch.nn.Module, ids: torch.Tensor, layers: int, backend: str = "auto"
) -> Callable[[], None]:
    """The timed callable of ``provider`` on ``base`` (modified in place: pass a copy)."""
    if provider == "frozen":
        return FrozenStep(base, ids)
    model, update = adapt(base, provider, backend)
    n = count_adapted(model)
    if n != 7 * layers:
        raise RuntimeError(f"{provider}: {n} adapted modules, expected {7 * layers}")
    return OptimizerStep(model, ids, update)


def shape_label(m: dict[str, int]) -> str:
    return f"{m['layers']}L h{m['hidden']} i{m['intermediate']} v{m['vocab']} b{m['batch']}x{m['seq']}"


# ---- pytest-benchmark (the CPU model) -----------------------------------------------------------
@pytest.mark.parametrize("provider", PROVIDERS)
def test_train_e2e(benchmark: Any, provider: str) -> None:
    if provider.startswith("peft"):
        pytest.importorskip("peft")
    m = CPU_MODEL
    benchmark.group = f"{OP} {shape_label(m)} fp32 (CPU)"
    ids = input_ids(m, "cpu")
    fn = make_step(provider, build_base(m, "cpu", torch.float32), ids, m["layers"])
    benchmark.extra_info.update(
        provider=provider, mode=FROZEN_MODE if provider == "frozen" else STEP_MODE,
        tokens=m["batch"] * m["seq"], threads=torch.get_num_threads(),
    )  # fmt: skip
    benchmark.pedantic(fn, rounds=10, warmup_rounds=2, iterations=1)
    assert all(torch.isfinite(x) for x in fn.losses)


# ---- script mode --------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    add_common_args(parser)
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
        help="where to run (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--quick", action="store_true",
        help="a short run: fewer timed steps (CUDA: the same model; CPU: a smaller model too)",
    )  # fmt: skip
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument(
        "--backend", choices=("auto", "torch", "triton"), default="auto",
        help="adalora_fast's backend (default auto: Triton on CUDA, PyTorch on the CPU)",
    )  # fmt: skip
    parser.add_argument("--iters", type=int, help="CPU round-robin rounds (default 20; 4 with --quick)")
    parser.add_argument("--cpu-warmup", type=int, help="CPU untimed rounds (default 2; 1 with --quick)")
    parser.add_argument(
        "--min-samples",
        type=int,
        help="GPU: timed steps per do_bench call at least (default 10; 3 with --quick)",
    )
    parser.add_argument(
        "--rounds", type=int, help="GPU: do_bench rounds per provider (default 3; 1 with --quick)"
    )
    parser.add_argument(
        "--dtype", choices=tuple(DTYPES), help="base weights (default: bfloat16 on CUDA, float32 on CPU)"
    )
    for key in SHAPE_KEYS:
        parser.add_argument(
            f"--{key}", type=int, help=f"model shape override (GPU {GPU_MODEL[key]}, CPU {CPU_MODEL[key]})"
        )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible to torch")
    args.iters = args.iters or (4 if args.quick else 20)
    args.cpu_warmup = args.cpu_warmup if args.cpu_warmup is not None else (1 if args.quick else 2)
    args.min_samples = args.min_samples or (3 if args.quick else 10)
    args.rounds = args.rounds or (1 if args.quick else 3)
    preset = GPU_MODEL if args.device == "cuda" else (CPU_QUICK_MODEL if args.quick else CPU_MODEL)
    args.model = {k: getattr(args, k) or preset[k] for k in SHAPE_KEYS}
    args.preset = args.model == (GPU_MODEL if args.device == "cuda" else CPU_MODEL)
    args.dtype = (
        DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    )
    args.providers = [p for p in PROVIDERS if p in args.providers]
    return args


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def check_losses(steps: dict[str, Any], dtype: torch.dtype, failures: list[str]) -> None:
    """Finite losses everywhere; ours vs PEFT AdaLoRA over the first steps (same models and data)."""
    for p, fn in steps.items():
        bad = [i for i, x in enumerate(fn.losses) if not math.isfinite(float(x))]
        if bad:
            failures.append(f"{p}: non-finite loss at logged steps {bad[:5]}")
    if OURS in steps and "peft_adalora" in steps:
        ours, peer = steps[OURS].losses, steps["peft_adalora"].losses
        n = min(len(ours), len(peer))
        if n == 0:
            return
        diff = max(abs(float(a) - float(b)) for a, b in zip(ours[:n], peer[:n], strict=True))
        tol = PARITY_TOL.get(dtype, 5e-2)
        status = "OK" if diff <= tol else "FAILED"
        print(
            f"loss parity ours vs peft_adalora over the first {n} steps: max |diff| {diff:.2e} "
            f"(tol {tol:g}; step-1 loss {float(ours[0]):.6f} vs {float(peer[0]):.6f}): {status}",
            flush=True,
        )
        if diff > tol:
            failures.append(f"loss parity: ours and peft_adalora differ by {diff:.2e} (tol {tol:g})")


def time_on_cpu(steps: dict[str, Any], args: argparse.Namespace, ms: dict[str, float]) -> None:
    """Round-robin medians into ``ms``; the per-round throughput ratios are printed."""
    times = time_cpu_interleaved(steps, warmup=args.cpu_warmup, iters=args.iters)
    ms.update({p: statistics.median(ts) for p, ts in times.items()})
    print(f"\n{args.iters} round-robin rounds after {args.cpu_warmup} untimed; per-round throughput ratios:")
    for peer in GOALS:
        if OURS in times and peer in times:
            per_round = sorted(b / a for a, b in zip(times[OURS], times[peer], strict=True))
            q = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else per_round * 3
            of_minima = min(times[peer]) / min(times[OURS])
            print(
                f"  ours/{peer}: median {statistics.median(per_round):.3f} "
                f"(quartiles {q[0]:.3f}-{q[2]:.3f}; ratio of minima {of_minima:.3f})"
            )


def time_on_gpu(
    steps: dict[str, Any], args: argparse.Namespace, ms: dict[str, float], failures: list[str]
) -> None:
    """Into ``ms``: the median over ``args.rounds`` rounds of each provider's do_bench median (the
    order rotates), updated after every measurement, so that an interrupted run keeps what it has."""
    names = list(steps)
    per: dict[str, list[float]] = {p: [] for p in names}
    for i in range(args.rounds):
        k = i % len(names)
        for p in names[k:] + names[:k]:
            if p not in per:
                continue
            try:
                t = gpu_median_ms(steps[p], warmup=args.warmup, rep=args.rep, min_samples=args.min_samples)
            except torch.cuda.OutOfMemoryError as err:
                failures.append(f"{p}: out of memory while timing ({err})")
                del per[p]
                free_memory()
                continue
            per[p].append(t)
            ms[p] = statistics.median(per[p])
            print(f"  round {i + 1} {p:13s} {t:9.2f} ms", flush=True)


def report(ms: dict[str, float], args: argparse.Namespace, device: str) -> None:
    m = args.model
    tokens = m["batch"] * m["seq"]
    tps = {p: tokens / (t / 1e3) for p, t in ms.items()}
    print(
        f"\n{device} ({describe_environment()}); model {shape_label(m)}, {str(args.dtype)[6:]} base, "
        f"fp32 adapters, {7 * m['layers']} projections adapted (all 7 of every layer) at r {INIT_R}, "
        f"{tokens} tokens per step.\n"
    )
    print("| provider | step | ms / step | tokens/s | ours / provider | x frozen fwd+bwd time |")
    print("|---|---|---:|---:|---:|---:|")
    for p in args.providers:
        if p not in ms:
            print(f"| {p} | {FROZEN_MODE if p == 'frozen' else STEP_MODE} | failed | - | - | - |")
            continue
        vs = _ratio(tps.get(OURS), tps[p]) if p != OURS else None
        print(
            f"| {p} | {FROZEN_MODE if p == 'frozen' else STEP_MODE} | {ms[p]:.2f} | {tps[p]:,.0f} "
            f"| {_fmt(vs, '.3f')} | {_fmt(_ratio(ms[p], ms.get('frozen')), '.3f')} |"
        )
    print()
    for peer, goal in GOALS.items():
        r = _ratio(tps.get(OURS), tps.get(peer))
        verdict = "-" if r is None else ("MET" if r >= goal else "NOT MET")
        where = "" if device == "cuda" else " (the goal is set for the GPU)"
        print(
            f"GOAL train_e2e ours/{peer} throughput on {device}: {_fmt(tps.get(OURS), ',.0f')} / "
            f"{_fmt(tps.get(peer), ',.0f')} tokens/s = {_fmt(r, '.3f')} (goal >= {goal}){where}: {verdict}"
        )


def rows(ms: dict[str, float], args: argparse.Namespace) -> list[dict[str, Any]]:
    m = args.model
    op = OP if args.preset else f"{OP} {shape_label(m)}"
    return [
        {
            "op": op,
            "mode": FROZEN_MODE if p == "frozen" else STEP_MODE,
            "provider": p,
            "d_in": m["hidden"],
            "d_out": m["intermediate"],
            "tokens": m["batch"] * m["seq"],
            "r": None if p == "frozen" else INIT_R,
            "dtype": args.dtype,
            "median_ms": ms[p],
        }  # fmt: skip
        for p in args.providers
        if p in ms
    ]


def run(args: argparse.Namespace, ms: dict[str, float], failures: list[str]) -> None:
    """Build every provider on copies of one base model, run one step each, time them into ``ms``."""
    device, m = args.device, args.model
    base = build_base(m, device, args.dtype)
    ids = input_ids(m, device)
    steps: dict[str, Any] = {}
    for p in args.providers:
        if p.startswith("peft"):
            try:
                import peft  # noqa: F401
            except ImportError:
                failures.append(f"{p}: peft is not installed")
                continue
        try:
            steps[p] = make_step(p, copy.deepcopy(base), ids, m["layers"], args.backend)
            steps[p]()  # first step: compiles / autotunes the kernels; checks the provider runs
            if device == "cuda":
                torch.cuda.synchronize()
        except Exception as err:  # one provider's failure (e.g. out of memory) does not stop the others
            failures.append(f"{p}: {type(err).__name__}: {err}")
            traceback.print_exc()
            steps.pop(p, None)
            free_memory()
            continue
        info = (
            f"{steps[p].n_trainable:,} trainable parameters" if p != "frozen" else "no trainable parameters"
        )
        print(f"built {p}: {info}", flush=True)
    del base
    free_memory()
    if not steps:
        return
    if device == "cuda":
        mem = torch.cuda.max_memory_allocated() / 2**30
        print(f"peak GPU memory so far {mem:.1f} GiB", flush=True)
        print(
            f"\ndo_bench medians (warmup {args.warmup} ms, rep {args.rep} ms, >= {args.min_samples} timed "
            f"steps), {args.rounds} round(s):",
            flush=True,
        )
        time_on_gpu(steps, args, ms, failures)
    else:
        time_on_cpu(steps, args, ms)
    check_losses(steps, args.dtype, failures)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda":
        force_compiled_triton()
    csv_name = GPU_CSV if args.device == "cuda" else CPU_CSV
    _, csv_path = script_start(args.out, args.no_csv, args.threads, csv_name, csv_name)
    print(f"# {OP} benchmark (optimizer-step throughput)\n\n{describe_environment()}\n")
    print(
        f"model {shape_label(args.model)}, {str(args.dtype)[6:]}, {args.device}, providers "
        f"{' '.join(args.providers)}, adalora_fast backend {args.backend}\n",
        flush=True,
    )
    failures: list[str] = []
    ms: dict[str, float] = {}
    try:
        run(args, ms, failures)
    except Exception as err:
        failures.append(f"unexpected {type(err).__name__}: {err}")
        print("\nABORTED by an unexpected error:", file=sys.stderr)
        traceback.print_exc()
    except KeyboardInterrupt as err:
        failures.append(f"interrupted ({err or 'Ctrl-C'})")
        print(f"\nINTERRUPTED ({err or 'Ctrl-C'})", file=sys.stderr, flush=True)
    report(ms, args, args.device)
    if csv_path is not None and ms:
        append_rows(csv_path, rows(ms, args))
    return script_end(failures, csv_path)


if __name__ == "__main__":
    sys.exit(main())
