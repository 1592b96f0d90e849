"""Does curation help? Does the mix matter? (issue #5, Llama 3 §3.1)

Runs the same short pretraining three times and prints validation loss per source side by side:
  raw       --no-curation, the paper mix
  curated   curation on, the paper mix (what python 03_pretrain.py does)
  natural   curation on, each source weighted by its size instead
The validation documents are the same raw held-out documents in all three runs.

    python benchmarks/compare_data.py [--steps 150] [--out runs/compare_data]
"""
import argparse
import importlib
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
pre = importlib.import_module("03_pretrain")

RUNS = {"raw": ["--no-curation"], "curated": [], "natural": ["--mix", "natural"]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--out", default="runs/compare_data")
    args, rest = parser.parse_known_args()
    results = {}
    for name, flags in RUNS.items():
        out = Path(args.out) / name
        shutil.rmtree(out, ignore_errors=True)
        pre.main(["--steps", str(args.steps), "--out", str(out), "--sample-every", "1000000", *flags, *rest])
        results[name] = json.loads((out / "metrics.json").read_text())["val_loss"]
    sources = sorted(results["raw"])
    print(f"\nvalidation loss after {args.steps} steps (nats/token; lower is better)")
    print(f"{'source':<16}" + "".join(f"{name:>10}" for name in RUNS))
    for source in sources + ["mean"]:
        values = [sum(r.values()) / len(r) if source == "mean" else r[source] for r in results.values()]
        print(f"{source:<16}" + "".join(f"{v:>10.3f}" for v in values))
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
