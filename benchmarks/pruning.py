"""Sample pruning on real data: MAE pre-training on a CIFAR-10 subset with no pruning, SeTa and InfoBatch.

For each method: wall time of the training loop, images streamed, FLOPs spent vs the unpruned budget, final
reconstruction loss, and the quality of the encoder as a linear probe (logistic regression on frozen,
mean-pooled encoder features, trained on the train subset, scored on held-out CIFAR-10 test images).

    python benchmarks/pruning.py --train-per-class 500 --test-per-class 100 --epochs 20 --out pruning.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MODEL = ["model.img_size=32", "model.patch_size=4", "model.embed_dim=96", "model.depth=4", "model.num_heads=3",
         "model.decoder_embed_dim=64", "model.decoder_depth=1", "model.decoder_num_heads=2",
         "model.norm_pix_loss=true"]


def write_cifar(cache: Path, per_class: dict[str, int]) -> Path:
    from mae_curriculum.data.write_shards import Sample, write_samples

    root = cache / f"cifar_{per_class['train']}_{per_class['test']}"
    if (root / "test" / "_info.json").is_file():
        return root
    got = {s: [] for s in per_class}
    counts = {(s, c): 0 for s in per_class for c in CLASSES}
    with tarfile.open(CIFAR, "r:gz") as tf:
        for m in tf:
            p = m.name.split("/")
            if m.isfile() and len(p) == 4 and p[1] in per_class and counts[(p[1], p[2])] < per_class[p[1]]:
                counts[(p[1], p[2])] += 1
                got[p[1]].append(Sample(key=f"{p[1]}_{p[2]}_{p[3].split('.')[0]}", image=tf.extractfile(m).read(),
                                        ext="jpg", cls=CLASSES.index(p[2])))
    for split, samples in got.items():
        random.Random(0).shuffle(samples)
        write_samples(samples, root / split, split=split, samples_per_shard=1000, classes=CLASSES)
    return root


@torch.no_grad()
def features(export: Path, shards: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from mae_curriculum.data.index import load_index
    from mae_curriculum.data.loader import read_eval_samples
    from mae_curriculum.engine.checkpoint import load_exported

    model = load_exported(export).eval()
    index = load_index(shards)
    imgs, labels = read_eval_samples(index, index.num_samples, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    feats = []
    for i in range(0, len(imgs), 500):
        x = (imgs[i:i + 500].float() / 255 - mean) / std
        latent, _, _, _ = model.forward_encoder(x, 0.0)
        feats.append(latent[:, 1:].mean(1))
    return torch.cat(feats), labels


def linear_probe(xtr, ytr, xte, yte, steps: int = 300) -> float:
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    torch.manual_seed(0)
    head = torch.nn.Linear(xtr.shape[1], 10)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(xtr), ytr) + 1e-3 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return float((head(xte).argmax(1) == yte).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-per-class", type=int, default=500)
    ap.add_argument("--test-per-class", type=int, default=100)
    ap.add_argument("--epochs", type=float, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--methods", default="none,seta,infobatch")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--cache", default="/tmp/mae_curriculum_bench")
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    data = write_cifar(Path(args.cache), {"train": args.train_per_class, "test": args.test_per_class})
    rows = []
    for method in args.methods.split(","):
        out = Path(args.cache) / f"pruning_{method}"
        cmd = [sys.executable, str(ROOT / "pretrain.py"), "--config", str(ROOT / "configs" / "demo.yaml"), *MODEL,
               f"output_dir={out}", f"data.train_shards={data / 'train'}", f"data.val_shards={data / 'test'}",
               f"train.epochs={args.epochs}", f"train.batch_size={args.batch}", "curriculum.schedule=constant",
               "optim.warmup_epochs=2", "data.num_workers=1", "log.progress_bar=false", "log.vis_every_epochs=0",
               "checkpoint.every_epochs=0", "checkpoint.every_minutes=0", f"pruning.method={method}",
               f"pruning.ratio={args.ratio}", "--resume", "none"]
        subprocess.run(["rm", "-rf", str(out)], check=True)
        t0 = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
        wall = time.time() - t0
        if r.returncode != 0:
            sys.exit(f"{method}: pretrain failed:\n{r.stderr[-3000:]}")
        final = json.loads((out / "final.json").read_text())
        xtr, ytr = features(out / "export", data / "train")
        xte, yte = features(out / "export", data / "test")
        acc = linear_probe(xtr, ytr, xte, yte)
        rows.append({"method": method, "wall_s": round(wall, 1), "images": final["samples"],
                     "flops_vs_full": round(final["flops"] / final["full_flops"], 3),
                     "final_loss": round(final["final_loss"], 4), "linear_probe_top1": round(acc, 4),
                     "epochs": final["epoch"], "steps": final["step"]})
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    print("\n| method | epochs | images streamed | compute vs unpruned | process wall s | final loss | linear-probe top-1 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['epochs']} | {r['images']} ({r['images'] / base['images']:.2f}x) | "
              f"{r['flops_vs_full']:.3f} | {r['wall_s']} | {r['final_loss']} | {100 * r['linear_probe_top1']:.1f}% |")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
