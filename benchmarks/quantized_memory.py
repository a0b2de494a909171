"""Memory of a Llama built from a config (random weights, no downloads) loaded plain and quantised with
bitsandbytes, with AdaLoRA on all 7 projections (init_r 12): transformers' ``get_memory_footprint()``
of the base (parameters and buffers; bitsandbytes' 4-bit block statistics live in its quant state
and are not counted), the projections' weights alone, and the trainable adapters. CPU; writes
``results/cpu_quantized_memory.csv``.

    python benchmarks/quantized_memory.py [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import warnings
from pathlib import Path

import harness
import torch

import adalora_fast as af

MODEL = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
             num_attention_heads=16, num_key_value_heads=16)  # fmt: skip
COLUMNS = ("base", "footprint_mib", "projections_mib", "adapters_mib", "hidden", "layers", "vocab", "init_r")


def _formats():
    from transformers import BitsAndBytesConfig

    bf16 = torch.bfloat16
    return [
        ("fp32", {}),
        ("bf16", {"torch_dtype": bf16}),
        ("int8", {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}),
        ("nf4", {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=bf16)}),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=harness.RESULTS_DIR)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    folder = tempfile.mkdtemp()
    LlamaForCausalLM(LlamaConfig(**MODEL)).save_pretrained(folder)
    rows = []
    for name, kw in _formats():
        if "quantization_config" in kw:
            kw = {**kw, "device_map": "cpu", "torch_dtype": torch.bfloat16}
        model = AutoModelForCausalLM.from_pretrained(folder, **kw)
        footprint = model.get_memory_footprint()
        proj = sum(m.weight.numel() * m.weight.element_size() for n, m in model.named_modules()
                   if n.endswith("proj"))  # fmt: skip
        cfg = af.AdaLoraConfig(init_r=12, target_r=4, target_modules="all-projections", total_step=100)
        adapted = af.get_adalora_model(model, cfg)
        adapters = sum(p.numel() * p.element_size() for p in adapted.parameters() if p.requires_grad)
        row = {"base": name, "footprint_mib": footprint / 2**20, "projections_mib": proj / 2**20,
               "adapters_mib": adapters / 2**20, "hidden": MODEL["hidden_size"],
               "layers": MODEL["num_hidden_layers"], "vocab": MODEL["vocab_size"], "init_r": 12}  # fmt: skip
        rows.append(row)
        base_mib, proj_mib, adapter_mib = row["footprint_mib"], row["projections_mib"], row["adapters_mib"]
        print(f"{name:5s} base {base_mib:7.1f} MiB, projections {proj_mib:6.1f}, adapters {adapter_mib:4.1f}")
    env = harness.environment()
    path = args.out / "cpu_quantized_memory.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*COLUMNS, "torch", "commit", "date"])
        writer.writeheader()
        for row in rows:
            cells = {k: f"{v:.1f}" if isinstance(v, float) else v for k, v in row.items()}
            writer.writerow({**cells, **{k: env[k] for k in ("torch", "commit", "date")}})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
