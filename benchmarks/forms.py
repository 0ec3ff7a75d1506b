"""Ensemble forms: memory and step time per form and M (members_as = full / head / lora /
batchensemble), and each diversity method's step over the deep ensemble of the same form.

Models, built locally and randomly initialized (nothing downloads):
* ``transformer``: a 6-layer encoder of width 256 (4 heads, MLP 1024) over 16 tokens of
  32 features, mean-pooled, a 10-class head; LoRA r = 8 on q, k, v, o, fc1, fc2.
* ``resnet20``: diverse's CIFAR ResNet-20 on 3×32×32; LoRA r = 8 on every conv.

Per form and M: the bytes of what training holds per parameter — parameters, gradients and
Adam's two moments for trained tensors, the parameters alone for frozen shared ones
(``state_bytes``; its ratio to one full model's, ``vs_one_full``) — and the median time of
one ``diverse.train_step`` (DE) over ``--repeats`` steps, forms interleaved. Peak memory
of a step is read on CUDA only (``torch.cuda.max_memory_allocated``); this CPU script
reports the bytes above.

Run: ``python benchmarks/forms.py [--model transformer|resnet20|vit-b16] [--members 1 5 10 20]
[--device cuda]``; on CUDA the table gains the peak memory of one step.
Figures in benchmarks/README.md (machine, load and versions in the printed header).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from torch import nn

import diverse
from diverse.nets.forms import BatchEnsemble, Head, LoRA
from diverse.nets.likelihoods import Categorical


class Block(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.norm1(x)
        q, k, v = (f(h).view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for f in (self.q, self.k, self.v))
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, -1) @ v
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))


class Encoder(nn.Module):
    def __init__(self, features: int = 32, width: int = 256, depth: int = 6,
                 classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(features, width)
        self.blocks = nn.Sequential(*(Block(width, 4, 4 * width) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.blocks(self.embed(x))).mean(1))


class ViT(nn.Module):
    """ViT-B/16 at 224 px (86M parameters), built locally and randomly initialized."""

    def __init__(self, width: int = 768, depth: int = 12, heads: int = 12,
                 classes: int = 1000) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, width, 16, stride=16)
        self.pos = nn.Parameter(torch.zeros(1, 196, width))
        self.blocks = nn.Sequential(*(Block(width, heads, 4 * width) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.fc(self.norm(self.blocks(tokens)).mean(1))


def vit_b16() -> nn.Module:
    torch.manual_seed(0)
    return ViT()


def transformer() -> nn.Module:
    torch.manual_seed(0)
    return Encoder()


def resnet20() -> nn.Module:
    from diverse.nets.models import ResNetConfig, build_resnet

    torch.manual_seed(0)
    return build_resnet(ResNetConfig(name="resnet20"), (3, 32, 32), 10)


MODELS = {
    "transformer": (transformer, (16, 32), ("q", "k", "v", "o", "fc1", "fc2"), "fc"),
    "resnet20": (resnet20, (3, 32, 32), ("conv1", "conv2"), "fc"),
    # the GPU script's model (benchmarks/gpu_all.sh): too large for this CPU's step times
    "vit-b16": (vit_b16, (3, 224, 224), ("q", "k", "v", "o", "fc1", "fc2"), "fc"),
}


def frozen(build):
    def make() -> nn.Module:
        net = build()
        for name, p in net.named_parameters():
            p.requires_grad_(name.startswith("fc."))
        return net
    return make


def forms(model: str):
    build, _shape, targets, head = MODELS[model]
    return {
        "full": (build, None),
        "head": (build, Head((head,))),
        "lora": (build, LoRA(rank=8, alpha=16.0, target_modules=targets,
                             modules_to_save=(head,))),
        "batchensemble": (build, BatchEnsemble()),
    }


def state_bytes(ens: diverse.Ensemble) -> int:
    trained = sum(v.numel() * v.element_size() for v in ens.trainable.values())
    fixed = sum(v.numel() * v.element_size() for k, v in ens.shared.items()
                if "shared/" + k not in ens.trainable)
    fixed += sum(v.numel() * v.element_size() for v in ens.member_buffers.values())
    return 4 * trained + fixed  # parameter, gradient, Adam's two moments


def step_time(ens: diverse.Ensemble, method: diverse.Method, x: torch.Tensor, y: torch.Tensor,
              repeats: int) -> float:
    opt = torch.optim.Adam(list(ens.trainable.values()), lr=1e-4)
    target = diverse.LogPosterior(Categorical(), 50_000, 1.0)
    state = method.init_state(ens)
    times = []
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        diverse.train_step(ens, method, opt, (x, y), target, progress=0.5, index=i,
                           state=state)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="transformer")
    parser.add_argument("--members", type=int, nargs="+", default=[1, 5, 10, 20])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (peak memory on CUDA)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--methods", nargs="*", default=["svgd", "f-wgd", "forde", "he-cka"])
    args = parser.parse_args()
    build, shape, _targets, _head = MODELS[args.model]
    print(f"# {args.model}: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, batch {args.batch}")
    g = torch.Generator().manual_seed(1)
    device = torch.device(args.device)
    x = torch.randn(args.batch, *shape, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
    one_full = state_bytes(diverse.Ensemble(build, 1))
    de = diverse.build_method(diverse.DeepEnsembleConfig())
    print("| form | M | trained params | state MB | vs one full | DE step ms |")
    print("|---|---|---|---|---|---|")
    ensembles = {}
    for m in args.members:
        for name, (factory, form) in forms(args.model).items():
            ens = de.ensemble(factory, m, members_as=form, execution="vmap",
                              device=device).train()
            ensembles[name, m] = ens
    times: dict[tuple[str, int], list[float]] = {k: [] for k in ensembles}
    peak: dict[tuple[str, int], float] = {}
    for _ in range(3):  # interleaved rounds
        for key, ens in ensembles.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times[key].append(step_time(ens, de, x, y, args.repeats))
            if device.type == "cuda":
                peak[key] = torch.cuda.max_memory_allocated(device) / 2**20
    for (name, m), ens in ensembles.items():
        trained = sum(v.numel() for v in ens.trainable.values())
        print(f"| {name} | {m} | {trained:,} | {state_bytes(ens) / 2**20:.1f} | "
              f"{state_bytes(ens) / one_full:.2f} | {1e3 * min(times[name, m]):.1f} |"
              + (f" peak {peak[name, m]:.0f} MB |" if (name, m) in peak else ""))
    single = diverse.Ensemble(frozen(build), 1, execution="vmap", device=device).train()
    t_single = min(step_time(single, de, x, y, args.repeats) for _ in range(3))
    head10 = min(times.get(("head", 10), [float("nan")]))
    print(f"\nhead M=10 step / single model with the same frozen backbone and one head: "
          f"{head10 / t_single:.2f} ({1e3 * head10:.1f} / {1e3 * t_single:.1f} ms)")
    if args.methods:
        m = 5
        print(f"\n| form | method | step ms (M={m}) | over DE |\n|---|---|---|---|")
        configs = {"svgd": diverse.SVGDConfig(), "f-wgd": diverse.WGDConfig(name="f-wgd"),
                   "forde": diverse.FoRDEConfig(lengthscales="identity"),
                   "he-cka": diverse.HECKAConfig(layers=("output",))}
        data = diverse.TrainingData(inputs=x.cpu(), targets=y.cpu())
        for name in ("head", "lora"):
            factory, form = forms(args.model)[name]
            base = None
            for method_name in ["de", *args.methods]:
                method = de if method_name == "de" else diverse.build_method(
                    configs[method_name], data)
                ens = method.ensemble(factory, m, members_as=form, execution="vmap",
                                      device=device).train()
                t = min(step_time(ens, method, x, y, args.repeats) for _ in range(2))
                base = t if base is None else base
                print(f"| {name} | {method_name} | {1e3 * t:.1f} | {t / base:.2f} |")


if __name__ == "__main__":
    main()
