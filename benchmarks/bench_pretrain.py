"""Pretraining throughput of 03_pretrain.py's default preset on this machine: tokens/s and MFU.

On CPU (the `cpu` preset, fp32) MFU is measured against this machine's own fp32 matmul peak, taken
in the same run; on a GPU (the `gpu` preset: bf16, compiled, flash/flex attention) against the card's
datasheet bf16 peak. The first steps (compilation, warm-up) are left out of the median.

    python benchmarks/bench_pretrain.py                 # CPU: ~1 minute
    python benchmarks/bench_pretrain.py --steps 60      # GPU: ~2 minutes with compilation
"""
import argparse
import importlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
pre = importlib.import_module("03_pretrain")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=None, help="default: 20 on CPU, 60 on GPU")
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the median")
    args, rest = parser.parse_known_args()
    cuda = torch.cuda.is_available()
    steps = args.steps or (60 if cuda else 20)
    with tempfile.TemporaryDirectory() as out:
        pre.main(["--steps", str(steps), "--out", out, "--eval-every", "1000000", "--sample-every", "1000000",
                  "--ckpt-every", "1000000", *rest])
        records = [json.loads(line) for line in open(Path(out) / "log.jsonl")]
    header, steps_log = records[0], [r for r in records if "loss" in r][args.skip:]
    peak = header["peak_flops"]  # what the run divided by for its MFU
    dtype = torch.bfloat16 if header["config"]["dtype"] == "bfloat16" else torch.float32
    datasheet = pre.datasheet_peak(torch.device("cuda" if cuda else "cpu"), dtype) is not None
    tps = float(np.median([r["tokens_per_s"] for r in steps_log]))
    mfu = float(np.median([r["mfu"] for r in steps_log]))
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{name}: preset model {header['config']['model']} ({header['params'] / 1e6:.1f} M parameters), "
          f"{header['config']['dtype']}, batch {header['config']['batch_tokens']:,} tokens x seq {header['config']['seq_len']}")
    print(f"median over steps {args.skip + 1}-{steps}: {tps:,.0f} tokens/s, MFU {mfu:.1%} "
          f"(peak {'from the datasheet' if datasheet else 'measured at the start of the run'}: {peak / 1e12:.3f} TFLOP/s)")


if __name__ == "__main__":
    main()
