"""Real-data benchmark: Fashion-MNIST at 64x64 RGB, (un)conditional seed64, prior vs GMM sampler.

    .venv/bin/python bench/bench_fashion_mnist.py [--epochs 5] [--max-samples 20000] [--out runs/fmnist]

Runs, through the CLI as a user would (each step is skipped when its output already exists, so an
interrupted benchmark continues):
  1. bench/fashion_mnist.py: the Debian package's idx files -> train.parquet / test.parquet
  2. vaeforge train (unconditional) and vaeforge train --conditional on train.parquet
  3. vaeforge fit-sampler for each (the GMM on encoder means)
  4. vaeforge evaluate --data test.parquet for each (prior and GMM samplers, TSTR, augmentation)
and prints one table: held-out ELBO, FID / precision / recall / density / coverage per sampler,
TSTR beside real->real accuracy, and the augmentation gain.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from fashion_mnist import prepare  # noqa: E402

VAEFORGE = [sys.executable, "-m", "vaeforge"]


def step(name: str, done: Path, argv: list[str]) -> None:
    if done.exists():
        print(f"[skip] {name}: {done} exists")
        return
    print(f"[run ] {name}: {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    subprocess.run([*VAEFORGE, *argv], check=True)
    print(f"[done] {name} in {time.perf_counter() - t0:.0f}s", flush=True)


def fmt(v: float | None, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def table(results: dict[str, dict]) -> str:
    head = "| model | sampler | held-out -ELBO (nats) | FID | precision | recall | density | coverage |"
    lines = [head, "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for model, m in results.items():
        elbo = m.get("likelihood", {}).get("neg_elbo_nats")
        for sampler, s in m["samplers"].items():
            d = s["distribution"]
            lines.append(
                f"| {model} | {sampler} | {fmt(elbo, '.1f')} | {d['fid']:.2f} | {d['precision']:.3f} | "
                f"{d['recall']:.3f} | {d['density']:.3f} | {d['coverage']:.3f} |"
            )
    for model, m in results.items():
        use = m["usefulness"]
        if "skipped" in use:
            lines.append(f"\n{model}: usefulness not measured ({use['skipped']})")
            continue
        t, a = use["tstr"], use["augmentation"]
        lines.append(
            f"\n{model} ({use['sampler']} samples): TSTR {t['tstr_accuracy']:.3f} vs real->real "
            f"{t['real_accuracy']:.3f} (gap {100 * (t['real_accuracy'] - t['tstr_accuracy']):.1f} points); "
            f"10% real {a['subset_accuracy']:.3f} -> +synthetic {a['augmented_accuracy']:.3f} "
            f"(gain {100 * a['gain']:+.1f} points)"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/fmnist"))
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--max-samples", type=int, default=20_000)
    ap.add_argument("--samples", type=int, default=5000, help="samples per sampler in evaluate")
    ap.add_argument("--models", default="uncond,cond")
    args = ap.parse_args()
    train_pq, test_pq = prepare(Path("data/fashion-mnist"))
    results = {}
    for model in args.models.split(","):
        run = args.out / model
        extra = ["--conditional"] if model == "cond" else []
        common = [
            "--data",
            str(train_pq),
            "--max-samples",
            str(args.max_samples),
            "--epochs",
            str(args.epochs),
        ]
        step(f"train {model}", run / "run.json", ["train", *common, *extra, "--output", str(run)])
        step(f"fit-sampler {model}", run / "eval" / ".fitted", ["fit-sampler", "--checkpoint", str(run)])
        (run / "eval").mkdir(exist_ok=True)
        (run / "eval" / ".fitted").touch()
        evaluate = [
            "evaluate",
            "--checkpoint",
            str(run),
            "--data",
            str(test_pq),
            "--samples",
            str(args.samples),
        ]
        step(f"evaluate {model}", run / "eval" / "metrics.json", evaluate)
        results[model] = json.loads((run / "eval" / "metrics.json").read_text())
    print()
    print(table(results))


if __name__ == "__main__":
    main()
