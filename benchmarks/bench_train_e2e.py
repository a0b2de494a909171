"""End-to-end training benchmark: optimizer-step throughput (tokens/s) of adalora_fast, PEFT AdaLoRA,
PEFT LoRA and the frozen model's forward + backward, on the same Llama-shaped model in one run.

Model (``harness.tiny_llama``, random weights): CUDA 8 layers, hidden 2048, MLP 5504, vocab 32000,
batch 4 x 2048, bf16; CPU 4 layers, hidden 512, MLP 1376, vocab 1000, batch 4 x 128, fp32 (``--quick``
on the CPU: 2 layers, hidden 256, MLP 688, batch 2 x 128; ``--layers`` ... ``--seq`` override). Each
provider trains its own copy on the same ids, all 7 projections adapted (fp32 adapters):
``adalora_fast`` (``--backend``, default auto), ``peft_adalora`` (``task_type="CAUSAL_LM"``, so PEFT
adds the regulariser as we do), ``peft_lora`` (r 12), and the baseline ``frozen`` (forward + backward
through the activations only: the floor of any adapter). Both AdaLoRA providers share
:func:`adalora_kwargs` (every step a mask step of the budget phase). One step = forward with labels,
backward, AdamW (lr 1e-3), ``update_and_allocate`` (AdaLoRA), ``zero_grad``. Each provider runs one
untimed step (compiles, autotunes); the check, before timing: two more steps of ours and PEFT
AdaLoRA, whose losses must agree (fp32 1e-4, bf16 5e-2). Goal on CUDA: ours >= 1.4x PEFT AdaLoRA's
throughput and >= PEFT LoRA's. Rows: op ``train_e2e`` (plus the shape when not the device's full
preset), mode ``fwd+bwd+step`` (``fwd+bwd`` for frozen), d_in = hidden, d_out = MLP width, tokens =
batch x seq, r 12, in ``<out>/cpu_train_e2e.csv`` or ``gpu_train_e2e.csv``; on CUDA with
``host_us`` (one step's enqueue time, the median of 5 on an idle device) and ``device_us`` (its
kernels' summed time): a step whose host_us exceeds its device_us is host-bound.

    python benchmarks/bench_train_e2e.py [--device cpu|cuda] [--quick] [--out DIR] [--no-csv]
    pytest benchmarks/bench_train_e2e.py --benchmark-only      # the CPU model, with pytest-benchmark
"""

from __future__ import annotations

import argparse
import copy
import sys
from typing import Any

import harness
import pytest
import torch
from harness import LLAMA_PROJ, Case

OP = "train_e2e"
STEP_MODE, FROZEN_MODE = "fwd+bwd+step", "fwd+bwd"
PROVIDERS = ("frozen", "adalora_fast", "peft_adalora", "peft_lora")
OURS = "adalora_fast"
GPU_MODEL = {"layers": 8, "hidden": 2048, "intermediate": 5504, "vocab": 32000, "batch": 4, "seq": 2048}
CPU_MODEL = {"layers": 4, "hidden": 512, "intermediate": 1376, "vocab": 1000, "batch": 4, "seq": 128}
CPU_QUICK_MODEL = {"layers": 2, "hidden": 256, "intermediate": 688, "vocab": 1000, "batch": 2, "seq": 128}
SHAPE_KEYS = tuple(GPU_MODEL)
GOALS = {"peft_adalora": 1.4, "peft_lora": 1.0}  # on CUDA: ours >= x times the peer's throughput
INIT_R, SEED, LR = 12, 0, 1e-3
LOSS_LOG = 16  # losses kept per provider
PARITY_STEPS = 2  # steps of the check, after the first (untimed) step
PARITY_TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-2}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def adalora_kwargs() -> dict[str, Any]:
    """The AdaLoRA hyper-parameters both AdaLoRA providers share (PEFT's names)."""
    return dict(init_r=INIT_R, target_r=8, tinit=0, tfinal=0, deltaT=1, beta1=0.85, beta2=0.85,
                orth_reg_weight=0.5, lora_alpha=8, lora_dropout=0.0, total_step=10**6,
                target_modules=list(LLAMA_PROJ))  # fmt: skip


def adapt(base: torch.nn.Module, provider: str, backend: str = "auto") -> tuple[torch.nn.Module, Any]:
    """``(model, update_and_allocate or None)`` of an adapter provider, adapters drawn from SEED + 1."""
    import adalora_fast as af

    torch.manual_seed(SEED + 1)
    if provider == OURS:
        model = af.get_adalora_model(base, af.AdaLoraConfig(**adalora_kwargs(), backend=backend))
        return model, model.update_and_allocate
    import peft

    if provider == "peft_adalora":
        model = peft.get_peft_model(base, peft.AdaLoraConfig(task_type="CAUSAL_LM", **adalora_kwargs()))
        return model, model.base_model.update_and_allocate
    if provider == "peft_lora":
        cfg = peft.LoraConfig(
            task_type="CAUSAL_LM", r=INIT_R, lora_alpha=8, lora_dropout=0.0, target_modules=LLAMA_PROJ
        )
        return peft.get_peft_model(base, cfg), None
    raise ValueError(f"unknown adapter provider {provider!r}; known: {PROVIDERS[1:]}")


class OptimizerStep:
    """One optimizer step per call (forward with labels, backward, AdamW, ``update_and_allocate`` when
    given, ``zero_grad``); the step counter starts at 1 (tinit = 0: step 0 never masks) and advances
    on every call; the first losses are kept, detached (no host sync)."""

    def __init__(self, model: torch.nn.Module, ids: torch.Tensor, update_and_allocate: Any = None) -> None:
        self.model, self.ids, self.update_and_allocate = model.train(), ids, update_and_allocate
        params = [p for p in model.parameters() if p.requires_grad]
        self.n_trainable = sum(p.numel() for p in params)
        self.opt = torch.optim.AdamW(params, lr=LR)
        self.step, self.losses = 1, []

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
    """The frozen model's forward (with labels) + backward through the activations only."""

    def __init__(self, base: torch.nn.Module, ids: torch.Tensor) -> None:
        self.model, self.ids, self.n_trainable, self.losses = base.train().requires_grad_(False), ids, 0, []
        with torch.no_grad():
            self.embeds = self.model.get_input_embeddings()(ids)

    def __call__(self) -> None:
        out = self.model(
            inputs_embeds=self.embeds.detach().requires_grad_(True), labels=self.ids, use_cache=False
        )
        out.loss.backward()
        if len(self.losses) < LOSS_LOG:
            self.losses.append(out.loss.detach())


def shape_label(m: dict[str, int]) -> str:
    return f"{m['layers']}L h{m['hidden']} i{m['intermediate']} v{m['vocab']} b{m['batch']}x{m['seq']}"


def parity(steps: dict[str, Any], dtype: torch.dtype, n_steps: int = PARITY_STEPS) -> tuple[bool, str]:
    """Run ``n_steps`` more steps of ours and PEFT AdaLoRA, compare every loss logged so far."""
    if "peft_adalora" not in steps:
        return True, "loss parity ours vs peft_adalora: not compared (peft_adalora not run)"
    for _ in range(n_steps):
        steps[OURS]()
        steps["peft_adalora"]()
    ours, peer = steps[OURS].losses, steps["peft_adalora"].losses
    n = min(len(ours), len(peer))
    diff = max(abs(float(a) - float(b)) for a, b in zip(ours[:n], peer[:n], strict=True))
    tol = PARITY_TOL.get(dtype, 5e-2)
    return diff <= tol, (
        f"loss parity ours vs peft_adalora over the first {n} steps: max |diff| {diff:.2e} "
        f"(tol {tol:g}; step-1 loss {float(ours[0]):.6f} vs {float(peer[0]):.6f})"
    )


def case_fields(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    m = args.model
    row = {"op": OP if args.preset else f"{OP} {shape_label(m)}", "mode": STEP_MODE, "d_in": m["hidden"],
           "d_out": m["intermediate"], "tokens": m["batch"] * m["seq"], "r": INIT_R,
           "dtype": args.dtype}  # fmt: skip
    return row, {"frozen": {"mode": FROZEN_MODE, "r": None}}


def rows(ms: dict[str, float], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The CSV rows of ``{provider: median ms}``."""
    row, fields = case_fields(args)
    return [{**row, "provider": p, **fields.get(p, {}), "median_ms": t} for p, t in ms.items()]


def setup(args: argparse.Namespace) -> Case:
    """Every provider on a copy of one base model, each run once (compiles, autotunes)."""
    m, device = args.model, args.device
    base = harness.tiny_llama(m["layers"], m["hidden"], m["intermediate"], m["vocab"], seed=SEED,
                              max_positions=max(256, m["seq"]), dtype=args.dtype, device=device)  # fmt: skip
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, m["vocab"], (m["batch"], m["seq"]), generator=g).to(device)
    row, fields = case_fields(args)
    case = Case({}, row, baseline="frozen", fields=fields, checked=(OURS,), reference="peft_adalora",
                title=f"{OP}: model {shape_label(m)}, {str(args.dtype)[6:]} base, {device}",
                host_device=True, host_iters=5)  # fmt: skip

    def build(p: str) -> Any:
        if p == "frozen":
            step = FrozenStep(copy.deepcopy(base), ids)
        else:
            model, update = adapt(copy.deepcopy(base), p, args.backend)
            step = OptimizerStep(model, ids, update)
        step()  # the first step: compiles / autotunes the kernels
        if device == "cuda":
            torch.cuda.synchronize()
        print(f"built {p}: {step.n_trainable:,} trainable parameters", flush=True)
        return step

    case.providers = harness.build_each(dict.fromkeys(["frozen", *args.providers]), build, case.failures)
    if device == "cuda":
        print(f"peak GPU memory so far {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
    case.check = lambda p: parity(case.providers, args.dtype)
    tokens = row["tokens"]
    case.columns = {
        "tokens/s": lambda k, t, same: f"{tokens / (t / 1e3):,.0f}",
        "ours / provider": lambda k, t, same: f"{t / same[OURS]:.3f}" if OURS in same and k != OURS else "-",
    }
    return case


def goal_lines(res: harness.Results, args: argparse.Namespace) -> list[str]:
    row, _ = case_fields(args)
    tps = {p: row["tokens"] / (t / 1e3) for p in (OURS, *GOALS) if (t := res.get(op=row["op"], provider=p))}
    out = []
    for peer, goal in GOALS.items():
        r = tps[OURS] / tps[peer] if OURS in tps and peer in tps else None
        fmt = {k: "-" if k not in tps else f"{tps[k]:,.0f}" for k in (OURS, peer)}
        verdict = "-" if r is None else ("MET" if r >= goal else "NOT MET")
        where = "" if args.device == "cuda" else " (the goal is set for the GPU)"
        out.append(
            f"GOAL train_e2e ours/{peer} throughput on {args.device}: {fmt[OURS]} / {fmt[peer]} tokens/s = "
            f"{'-' if r is None else f'{r:.3f}'} (goal >= {goal}){where}: {verdict}"
        )
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    harness.add_common_args(
        parser, PROVIDERS, iters=(20, 4), cpu_warmup=(2, 1), min_samples=(10, 3), rounds=(3, 1)
    )
    add = parser.add_argument
    add("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    add("--backend", choices=("auto", "torch", "triton"), default="auto", help="adalora_fast's backend")
    add("--dtype", choices=tuple(DTYPES), help="base weights (default: bfloat16 on CUDA, float32)")
    for key in SHAPE_KEYS:
        add(f"--{key}", type=int, help=f"shape override (GPU {GPU_MODEL[key]}, CPU {CPU_MODEL[key]})")
    args = harness.parse_args(parser, argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible to torch")
    preset = GPU_MODEL if args.device == "cuda" else (CPU_QUICK_MODEL if args.quick else CPU_MODEL)
    args.model = {k: getattr(args, k) or preset[k] for k in SHAPE_KEYS}
    args.preset = args.model == (GPU_MODEL if args.device == "cuda" else CPU_MODEL)
    args.dtype = DTYPES[args.dtype or ("bfloat16" if args.device == "cuda" else "float32")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return harness.run(args, [args], setup, title=f"{OP} benchmark (optimizer-step throughput)",
                       device=args.device, csv_names=("gpu_train_e2e.csv", "cpu_train_e2e.csv"),
                       goals=lambda res: goal_lines(res, args),
                       intro=f"model {shape_label(args.model)}, backend {args.backend}")  # fmt: skip


@pytest.fixture(scope="module")
def cpu_case() -> Case:
    pytest.importorskip("peft")
    return setup(parse_args(["--device", "cpu"]))


@pytest.mark.parametrize("provider", PROVIDERS)
def test_train_e2e(benchmark: Any, cpu_case: Case, provider: str) -> None:
    harness.pytest_benchmark(benchmark, cpu_case, provider)


if __name__ == "__main__":
    sys.exit(main())
