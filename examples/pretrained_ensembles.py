"""Ensembles of a pretrained model: full, head, LoRA and BatchEnsemble members, with
and without diversity, fine-tuned on a shifted task.

1. Pretrain a small CNN on Fashion-MNIST classes 0–4 (T-shirt … coat) and save it as
   ``OUT/backbone.safetensors`` (once; reused if present).
2. Fine-tune ensembles of M = 5 on classes 5–9 (sandal … ankle boot, relabelled 0–4)
   from that backbone with a new 5-class head, one process per (variant, seed):
   full copies (DE), heads on the frozen backbone (DE, SWAG, Laplace), LoRA adapters
   through peft (DE, SVGD with its kernel on the factors and on ΔW = s·B A, f-WGD, FoRDE,
   HE-CKA) and BatchEnsemble (DE).
3. Report on the 5,000 test images of classes 5–9: accuracy, NLL, ECE, OOD AUROC of the
   predictive entropy against scikit-learn's digits and synthetic outliers, member
   disagreement, mean pairwise linear CKA at ``fc1``, trainable parameters, the bytes
   of what training holds (parameters, gradients, Adam moments; frozen weights once),
   the process's peak RSS, and seconds.

    python examples/pretrained_ensembles.py --out runs/pretrained --seeds 0 1 2
    python examples/pretrained_ensembles.py --out /tmp/p --subset 600 --epochs 1 \\
        --seeds 0 --variants head-de lora-de      # a quick check

Results are in docs/studies (the table and the command); the processes run with one
thread each, ``--jobs`` at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

VARIANTS = {
    # name: (form, method, lr)
    "full-de": ("full", "de", 1e-3),
    "head-de": ("head", "de", 3e-3),
    "head-swag": ("head", "swag", 3e-3),
    "head-laplace": ("head", "laplace", 3e-3),
    "lora-de": ("lora", "de", 3e-3),
    "lora-svgd": ("lora", "svgd", 3e-3),
    "lora-svgd-delta": ("lora", "svgd-delta", 3e-3),
    "lora-f-wgd": ("lora", "f-wgd", 3e-3),
    "lora-forde": ("lora", "forde", 3e-3),
    "lora-he-cka": ("lora", "he-cka", 3e-3),
    "batchensemble-de": ("batchensemble", "de", 3e-3),
}
COLUMNS = ("accuracy", "nll", "ece", "auroc_digits", "auroc_synthetic", "disagreement",
           "cka_fc1", "trainable", "state_mb", "peak_rss_mb", "seconds")


def cnn():
    from torch import nn

    class CNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 16, 5)
            self.conv2 = nn.Conv2d(16, 32, 5)
            self.pool = nn.MaxPool2d(2)
            self.act = nn.ReLU()
            self.fc1 = nn.Linear(32 * 4 * 4, 128)
            self.fc2 = nn.Linear(128, 5)

        def forward(self, x):
            x = self.pool(self.act(self.conv1(x)))
            x = self.pool(self.act(self.conv2(x)))
            return self.fc2(self.act(self.fc1(x.flatten(1))))

    return CNN()


def data(subset: int):
    from diverse.data.datasets import DataConfig, load_dataset

    d = load_dataset(DataConfig(name="fashion-mnist", ood=("digits", "synthetic")))
    old_train, new_train = d.y_train < 5, d.y_train >= 5
    new_test = d.y_test >= 5
    x_new, y_new = d.x_train[new_train][:subset or None], d.y_train[new_train][:subset or None] - 5
    return ((d.x_train[old_train], d.y_train[old_train]), (x_new, y_new),
            (d.x_test[new_test], d.y_test[new_test] - 5), d.ood)


def pretrain(out: Path, epochs: int) -> Path:
    import torch
    from safetensors.torch import save_file

    path = out / "backbone.safetensors"
    if path.exists():
        return path
    (x, y), *_ = data(0)
    torch.manual_seed(0)
    net = cnn()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _epoch in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x), 128):
            idx = order[i:i + 128]
            loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in net.state_dict().items() if not k.startswith("fc2")}
    save_file(state, str(path))  # the backbone; the 5-class head is new in every member
    return path


def pretrained_factory(path: str):
    def make():
        from diverse.nets.models import load_weights

        net = cnn()
        load_weights(net, path)
        return net
    return make


def run_one(args: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    from torch.utils.data import DataLoader, TensorDataset

    import diverse
    from diverse import metrics
    from diverse.app.train import predict_trained
    from diverse.math import cka
    from diverse.nets.forms import BatchEnsemble, Head, LoRA
    from diverse.nets.likelihoods import Categorical

    form_name, method_name, lr = VARIANTS[args["variant"]]
    _old, (x, y), (x_test, y_test), ood = data(args["subset"])
    configs = {
        "de": diverse.DeepEnsembleConfig(),
        # 20 iterates collected over the second half of training
        "swag": diverse.SWAGConfig(swa_start=0.5, rank=10, predict_samples=4, swa_frequency=max(
            1, -(-len(x) // 64) * args["epochs"] // 40)),
        "laplace": diverse.LaplaceConfig(predict_samples=4),
        "svgd": diverse.SVGDConfig(repulsion_scale="batch"),
        "svgd-delta": diverse.SVGDConfig(repulsion_scale="batch", lora_space="delta"),
        "f-wgd": diverse.WGDConfig(name="f-wgd", repulsion_scale="batch"),
        "forde": diverse.FoRDEConfig(lengthscales="identity"),
        "he-cka": diverse.HECKAConfig(layers=("fc1", "output")),
    }
    forms = {"full": None, "head": Head(("fc2",)),
             "lora": LoRA(rank=4, alpha=8.0, target_modules=("conv1", "conv2", "fc1"),
                          modules_to_save=("fc2",)),
             "batchensemble": BatchEnsemble()}
    factory = pretrained_factory(args["backbone"])
    method = diverse.build_method(configs[method_name], diverse.TrainingData(inputs=x, targets=y))
    ens = method.ensemble(factory, args["members"], seed=args["seed"],
                          members_as=forms[form_name], execution="vmap")
    gen = torch.Generator().manual_seed(args["seed"])
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, generator=gen)
    train = diverse.TrainConfig(epochs=args["epochs"], lr=lr, seed=args["seed"],
                                prior_std=0.0 if method_name != "laplace" else 1.0)
    t0 = time.perf_counter()
    result = diverse.fit(ens, method, loader, n_train=len(x), train=train, show_progress=False)
    seconds = time.perf_counter() - t0
    like = Categorical()
    probs = predict_trained(method, like, ens, result.samples, x_test)["probs"]
    out = {"variant": args["variant"], "seed": args["seed"], "seconds": seconds}
    out.update(accuracy=float(metrics.accuracy(probs, y_test)),
               nll=float(metrics.nll(probs, y_test)), ece=float(metrics.ece(probs, y_test)),
               # a weight-sample method's members: their draws averaged (draw-major order)
               disagreement=float(metrics.disagreement(
                   probs.view(-1, ens.members, *probs.shape[1:]).mean(0)).mean()))
    for name, x_ood in ood.items():
        p_ood = predict_trained(method, like, ens, result.samples, x_ood)["probs"]
        out[f"auroc_{name}"] = metrics.ood_metrics(probs, p_ood, "entropy")["auroc"]
    with torch.no_grad():
        ens.eval()
        _o, feats = ens.features(x_test[:500], ["fc1"])
        matrix = cka.cka_matrix(feats["fc1"].reshape(ens.members, 500, -1))
        m = ens.members
        out["cka_fc1"] = float((matrix.sum() - matrix.diagonal().sum()) / (m * (m - 1)))
    out["trainable"] = sum(v.numel() for v in ens.trainable.values())
    trained = sum(v.numel() * v.element_size() for v in ens.trainable.values())
    fixed = sum(v.numel() * v.element_size() for k, v in ens.shared.items()
                if "shared/" + k not in ens.trainable)
    out["state_mb"] = (4 * trained + fixed) / 2**20
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def table(rows: list[dict]) -> str:
    lines = ["| variant | n | " + " | ".join(COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for variant in VARIANTS:
        mine = [r for r in rows if r["variant"] == variant]
        if not mine:
            continue
        cells = []
        for col in COLUMNS:
            values = [r[col] for r in mine if col in r]
            mean = statistics.fmean(values)
            if col in ("trainable",):
                cells.append(f"{int(mean):,}")
            elif col in ("state_mb", "peak_rss_mb", "seconds"):
                cells.append(f"{mean:.0f}" if col != "state_mb" else f"{mean:.2f}")
            else:
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{mean:.4f} ± {sd:.4f}" if col in ("accuracy", "nll", "ece")
                             else f"{mean:.3f}")
        lines.append(f"| {variant} | {len(mine)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/pretrained"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--subset", type=int, default=10_000,
                        help="fine-tuning examples of classes 5-9 (0: all 30,000)")
    parser.add_argument("--pretrain-epochs", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    backbone = pretrain(args.out, args.pretrain_epochs)
    results = args.out / "results.jsonl"
    done = [json.loads(line) for line in results.read_text().splitlines()] \
        if results.exists() else []
    todo = [{"variant": v, "seed": s, "members": args.members, "epochs": args.epochs,
             "subset": args.subset, "backbone": str(backbone)}
            for s in args.seeds for v in args.variants
            if not any(r["variant"] == v and r["seed"] == s for r in done)]
    os.environ["OMP_NUM_THREADS"] = "1"
    with ProcessPoolExecutor(args.jobs) as pool:
        for row in pool.map(run_one, todo):
            done.append(row)
            with results.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(f"{row['variant']} seed {row['seed']}: acc {row['accuracy']:.4f} "
                  f"({row['seconds']:.0f} s)", file=sys.stderr, flush=True)
    text = table([r for r in done if r["variant"] in args.variants and r["seed"] in args.seeds])
    (args.out / "results.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
