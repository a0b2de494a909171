"""``python -m adalora_fast``: the quickstart, end to end on a small Llama built from a config.

Adapts every projection with AdaLoRA, trains it for a few dozen steps on random tokens with a plain
PyTorch loop, saves a PEFT-format checkpoint, reloads it and checks that merged and unmerged outputs
agree. No downloads; runs on the CPU in well under a minute.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

import adalora_fast as af


def build_base(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m adalora_fast", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="adalora_quickstart", help="checkpoint directory")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    config = af.AdaLoraConfig(init_r=12, target_r=4, tinit=5, tfinal=10, deltaT=1, total_step=args.steps)
    model = af.get_adalora_model(build_base().to(args.device), config)
    print(f"adapted {len(model.adapted_names)} modules with init_r={config.init_r} on {args.device}")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    gen = torch.Generator().manual_seed(0)
    bar = tqdm(range(args.steps), desc="training")
    for step in bar:
        x = torch.randint(0, 256, (4, 32), generator=gen).to(args.device)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        budget = model.update_and_allocate(step)
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.4f}", budget=budget)

    ranks = model.kept_ranks()
    print(f"kept ranks (total {sum(ranks.values())} = target_r x {len(ranks)} modules):")
    for name, r in ranks.items():
        print(f"  {name:40s} {'#' * r}{'.' * (config.init_r - r)} {r}")
    out = Path(args.out)
    model.save_pretrained(out)
    print(f"saved PEFT-format adapter to {out}/")

    model.eval()
    x = torch.randint(0, 256, (2, 16), generator=gen).to(args.device)
    with torch.no_grad():
        reloaded = af.AdaLoraModel.from_pretrained(build_base().to(args.device), out).eval()
        unmerged = reloaded(input_ids=x).logits
        merged = reloaded.merge_and_unload()(input_ids=x).logits
    err = (merged - unmerged).abs().max().item()
    print(f"reloaded for inference; merged vs unmerged logits: max |diff| = {err:.2e}")
    if err > 1e-3:
        raise SystemExit("merged and unmerged outputs disagree")


if __name__ == "__main__":
    main()
