"""Train the 1-layer BERT of paper §5.1 on FirstTokenRepeatedOnce and save the bundled weights.

    python -m gradgraph.experiments.train_first_token [--epochs 42] [--out gradgraph/data/ftro_bert.safetensors]

10,000 balanced examples split 0.7 / 0.1 / 0.2; batch 32, Adam lr 1e-3, dropout 0.2 (the paper's code).
The bundled weights were trained with `--epochs 80 --overwrite` (OMP_NUM_THREADS=1): validation accuracy reached
100 % at epoch 54 (the paper: 42 epochs), test accuracy 99.7 %.
Training stops early once validation accuracy reaches 100 %.
"""
import argparse
import os
import time

import torch
from safetensors.torch import save_file

from gradgraph.toy import WEIGHTS, build_model, make_dataset


def accuracy(model, ids, labels):
    model.eval()
    with torch.no_grad():
        return (model(input_ids=ids).logits.argmax(-1) == labels).float().mean().item()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=42)
    ap.add_argument("--out", default=WEIGHTS)
    ap.add_argument("--overwrite", action="store_true", help="replace an existing weights file")
    a = ap.parse_args()
    if os.path.exists(a.out) and not a.overwrite:
        raise SystemExit(f"error: {a.out} exists; pass --overwrite to replace it")
    ids, labels = make_dataset(10_000, seed=0)
    tr, va, te = slice(0, 7000), slice(7000, 8000), slice(8000, 10_000)
    model = build_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    t0 = time.time()
    for epoch in range(a.epochs):
        model.train()
        perm = torch.randperm(7000, generator=g)
        for b in range(0, 7000, 32):
            idx = perm[b:b + 32]
            loss = model(input_ids=ids[tr][idx], labels=labels[tr][idx]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        va_acc = accuracy(model, ids[va], labels[va])
        print(f"epoch {epoch + 1}: loss {loss.item():.4f}  validation accuracy {va_acc:.4f}  ({time.time() - t0:.0f}s)")
        if va_acc == 1.0:
            break
    print(f"test accuracy {accuracy(model, ids[te], labels[te]):.4f}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, a.out)
    print(f"saved {a.out}")


if __name__ == "__main__":
    main()
