"""``adalora-fast demo``: watch AdaLoRA find where a model needs rank.

A small Llama is built from a config (no downloads). A *teacher* copy gets low-rank updates planted
in a few modules. A student (the base model with AdaLoRA on every linear layer) is trained to match
the teacher layer by layer: each student decoder layer sees the teacher's input to that layer and is
asked for the teacher's output, so a layer's error comes from its own modules only. The rank budget
then shrinks on AdaLoRA's schedule; the final allocation is printed as a table (layers x module types)
and saved as a heatmap, with the planted modules marked. The adapter is saved in PEFT's format, and
merged and unmerged outputs are checked to agree.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import AdaLoraConfig
from .model import get_adalora_model
from .testing import random_llama

PLANTED = ("model.layers.0.self_attn.v_proj", "model.layers.2.mlp.up_proj", "model.layers.3.mlp.down_proj")
MODULE_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PLANTED_RANK = 4
PLANTED_STRENGTH = 0.5  # spectral norm of each planted update (the base weights' is ~0.45)
LOSS_SCALE = 1000.0  # weighs the distillation loss against the regulariser (orth_reg_weight 0.5)


def build_base(seed: int = 0, vocab: int = 256, hidden: int = 128, layers: int = 4) -> nn.Module:
    """A small Llama with random weights (a stand-in for a pretrained model)."""
    return random_llama(layers, hidden, 2 * hidden, vocab, seed, max_positions=128).eval()


@torch.no_grad()
def plant_low_rank(model: nn.Module, names: tuple[str, ...], rank: int, strength: float, seed: int) -> None:
    """``W += strength * U V^T`` with random orthonormal U, V of ``rank`` columns, in each named module."""
    gen = torch.Generator().manual_seed(seed)
    for name in names:
        weight = model.get_submodule(name).weight
        u, _ = torch.linalg.qr(torch.randn(weight.shape[0], rank, generator=gen, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(weight.shape[1], rank, generator=gen, dtype=torch.float64))
        weight += (strength * u @ v.T).to(weight)


class LayerwiseDistillation:
    """Teacher-forced, layer-by-layer distillation through forward hooks on the decoder layers:
    the student's layer i gets the teacher's input of layer i; the loss is the sum over layers of the
    squared error of the layer outputs relative to the teacher output's variance."""

    def __init__(
        self, teacher: nn.Module, student_layers: nn.ModuleList, teacher_layers: nn.ModuleList
    ) -> None:
        self.teacher = teacher
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        self.forcing = False
        for layer in teacher_layers:
            layer.register_forward_pre_hook(self._record_input, with_kwargs=True)
            layer.register_forward_hook(self._record_output, with_kwargs=True)
        for i, layer in enumerate(student_layers):
            layer.register_forward_pre_hook(self._force(i), with_kwargs=True)
            layer.register_forward_hook(self._record_output, with_kwargs=True)

    def _record_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.inputs.append(args[0])

    def _record_output(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        self.outputs.append(out[0] if isinstance(out, tuple) else out)

    def _force(self, i: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            if not self.forcing:
                return None
            return (self.inputs[i], *args[1:]), kwargs

        return hook

    def loss(self, student: Callable[..., Any], input_ids: torch.Tensor) -> torch.Tensor:
        self.inputs.clear()
        self.outputs.clear()
        with torch.no_grad():
            self.teacher(input_ids=input_ids)
        targets = list(self.outputs)
        self.outputs.clear()
        self.forcing = True
        try:
            student(input_ids=input_ids)
        finally:
            self.forcing = False
        outputs, self.outputs = self.outputs, []
        return sum(F.mse_loss(o, t) / t.var() for o, t in zip(outputs, targets, strict=True))


@dataclass
class DemoResult:
    ranks: dict[str, int]
    planted: tuple[str, ...]
    init_r: int
    target_r: int
    out: Path
    merged_max_diff: float
    seconds: float
    losses: list[float] = field(default_factory=list)

    def planted_share(self) -> tuple[int, int, float, float]:
        """(ranks kept by the planted modules, all kept ranks, mean kept rank of a planted module, of
        any other module)."""
        planted = [self.ranks[n] for n in self.planted]
        others = [r for n, r in self.ranks.items() if n not in self.planted]
        return sum(planted), sum(self.ranks.values()), sum(planted) / len(planted), sum(others) / len(others)


def allocation_grid(ranks: dict[str, int]) -> tuple[list[int], list[list[int | None]]]:
    """(layer indices, rows of kept ranks by MODULE_TYPES) from ``{module name: kept rank}``."""
    layers = sorted({int(n.split(".layers.")[1].split(".")[0]) for n in ranks})
    grid: list[list[int | None]] = [[None] * len(MODULE_TYPES) for _ in layers]
    for name, r in ranks.items():
        layer = int(name.split(".layers.")[1].split(".")[0])
        kind = name.rsplit(".", 1)[1]
        if kind in MODULE_TYPES:
            grid[layers.index(layer)][MODULE_TYPES.index(kind)] = r
    return layers, grid


def allocation_table(ranks: dict[str, int], planted: tuple[str, ...]) -> str:
    """The allocation as a markdown table; planted modules marked with ``*``."""
    layers, grid = allocation_grid(ranks)
    marks = {(int(n.split(".layers.")[1].split(".")[0]), n.rsplit(".", 1)[1]) for n in planted}
    lines = ["| layer | " + " | ".join(MODULE_TYPES) + " |", "|---:|" + "---:|" * len(MODULE_TYPES)]
    for layer, row in zip(layers, grid, strict=True):
        cells = []
        for kind, r in zip(MODULE_TYPES, row, strict=True):
            text = "-" if r is None else str(r)
            cells.append(f"{text}*" if (layer, kind) in marks else text)
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_heatmap(ranks: dict[str, int], planted: tuple[str, ...], init_r: int, path: Path) -> Path | None:
    """A heatmap of the kept ranks (layers x module types), planted modules outlined. None without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Rectangle
    except ImportError:
        return None
    layers, grid = allocation_grid(ranks)
    values = [[float("nan") if r is None else r for r in row] for row in grid]
    fig, ax = plt.subplots(figsize=(1.1 * len(MODULE_TYPES) + 1.5, 0.55 * len(layers) + 1.6))
    image = ax.imshow(values, cmap="viridis", vmin=0, vmax=init_r, aspect="auto")
    ax.set_xticks(range(len(MODULE_TYPES)), MODULE_TYPES, rotation=30, ha="right")
    ax.set_yticks(range(len(layers)), [f"layer {i}" for i in layers])
    for i, row in enumerate(grid):
        for j, r in enumerate(row):
            if r is not None:
                ax.text(j, i, str(r), ha="center", va="center", color="white" if r < init_r / 2 else "black")
    for name in planted:
        layer, kind = int(name.split(".layers.")[1].split(".")[0]), name.rsplit(".", 1)[1]
        if layer in layers and kind in MODULE_TYPES:
            ax.add_patch(Rectangle((MODULE_TYPES.index(kind) - 0.5, layers.index(layer) - 0.5), 1, 1,
                                   fill=False, edgecolor="red", linewidth=2.5))  # fmt: skip
    fig.colorbar(image, ax=ax, label="kept rank")
    ax.set_title("AdaLoRA rank allocation (red: planted low-rank updates)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_demo(
    out: str | Path = "adalora_demo",
    device: str = "cpu",
    steps: int = 200,
    batch: int = 4,
    seq: int = 32,
    init_r: int = 8,
    target_r: int = 2,
    lr: float = 5e-3,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Train, print and save everything; returns what was found."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = build_base(seed)
    teacher = copy.deepcopy(base)
    plant_low_rank(teacher, PLANTED, PLANTED_RANK, PLANTED_STRENGTH, seed + 1)
    config = AdaLoraConfig(
        init_r=init_r, target_r=target_r, tinit=steps // 10, tfinal=max(1, steps // 5), deltaT=5,
        total_step=steps,
        lora_alpha=16, target_modules=list(MODULE_TYPES),
    )  # fmt: skip
    model = get_adalora_model(copy.deepcopy(base).to(device), config).train()
    teacher = teacher.to(device)
    n_layers = len(model.model.model.layers)
    log(f"adalora_fast demo on {device} (backend {model.backend}): a {n_layers}-layer Llama, AdaLoRA on all "
        f"{len(model.adapted_names)} linear layers, init_r={init_r} -> target_r={target_r}")  # fmt: skip
    log(f"planted rank-{PLANTED_RANK} updates in the teacher: {', '.join(PLANTED)}")
    distill = LayerwiseDistillation(teacher.model, model.model.model.layers, teacher.model.layers)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(seed + 2)
    losses = []
    bar = tqdm(range(steps), desc="training", disable=not progress)
    for step in bar:
        x = torch.randint(0, base.config.vocab_size, (batch, seq), generator=gen).to(device)
        task = distill.loss(model.model.model, x)
        loss = LOSS_SCALE * task + config.orth_reg_weight * model.orth_regularization()
        loss.backward()
        opt.step()
        budget = model.update_and_allocate(step)
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == steps - 1:
            losses.append(task.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}", budget=budget)

    ranks = model.kept_ranks()
    total = sum(ranks.values())
    budget = (
        f"the target budget, target_r x {len(ranks)} modules" if total == target_r * len(ranks) else "budget"
    )
    log(f"\nfinal rank allocation (kept ranks of {init_r}; total {total} = {budget}; * = planted):\n")
    log(allocation_table(ranks, PLANTED))
    model.save_pretrained(out / "adapter")
    log(f"\nadapter saved in PEFT's AdaLoRA format: {out / 'adapter'}/")
    png = save_heatmap(ranks, PLANTED, init_r, out / "rank_allocation.png")
    log(f"heatmap: {png}" if png else "heatmap skipped: pip install matplotlib")

    model.eval()
    x = torch.randint(0, base.config.vocab_size, (2, seq), generator=gen).to(device)
    with torch.no_grad():
        unmerged = model(input_ids=x).logits.float()
        model.merge()
        merged = model(input_ids=x).logits.float()
        model.unmerge()
    diff = (merged - unmerged).abs().max().item()
    log(f"merged vs unmerged logits: max |diff| = {diff:.2e}")
    result = DemoResult(ranks, PLANTED, init_r, target_r, out, diff, time.perf_counter() - start, losses)
    kept_planted, kept, mean_planted, mean_other = result.planted_share()
    log(f"the {len(PLANTED)} planted modules (of {len(ranks)}) keep {kept_planted} of the {kept} kept "
        f"ranks: {mean_planted:.1f} each on average, against {mean_other:.1f} for the other modules "
        f"({result.seconds:.0f} s)")  # fmt: skip
    return result
