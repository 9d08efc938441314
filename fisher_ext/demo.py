"""Demo: Tr(F) of a small CNN from one backward pass, checked against torch.func.

    fisher-ext check [--batch 64] [--seed 0] [--device cpu]    (or python -m fisher_ext.demo)

Labels are sampled from the model's own predictive distribution (the Fisher,
docs/design.md); fisher_trace's module hooks capture each layer's input and output
gradient, and the per-example-norm ops turn them into every example's squared
gradient norm. Tr(F) is their mean. The same numbers are then computed by
materializing all per-example gradients with torch.func, and both timings are
printed.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import fisher_ext


def small_cnn(num_classes: int = 10) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1, groups=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, num_classes),
    )


def per_example_sqnorms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """||grad_theta l_n||^2 for every example: one forward and one backward, with the fisher_ext ops."""
    return fisher_ext.fisher_trace(model, x, labels=y).per_example


def per_example_sqnorms_torch_func(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xn, yn):
        return nn.functional.cross_entropy(functional_call(model, p, (xn.unsqueeze(0),)), yn.unsqueeze(0))

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return sum(g.flatten(1).square().sum(1) for g in grads.values())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fisher-ext check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64, help="examples (1 to 4096; default 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args(argv)
    if not 1 <= args.batch <= 4096:  # torch.func materializes batch x 150k parameters
        parser.error(f"--batch: expected an int from 1 to 4096, got {args.batch}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device: expected cpu, cuda or cuda:N, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device: {args.device!r} requested, but torch sees no CUDA device")

    info = fisher_ext.build_info()
    print(f"fisher_ext {fisher_ext.__version__}: extension loaded={info['extension']}, "
          f"CPU ops on {info['backends']['CPU']['conv_sqnorm']}, CUDA ops on {info['backends']['CUDA']['conv_sqnorm']}")
    torch.manual_seed(args.seed)
    model = small_cnn().to(args.device)
    x = torch.randn(args.batch, 3, 32, 32, device=args.device)
    with torch.no_grad():  # the Fisher: labels sampled from the model's predictive distribution
        y = torch.distributions.Categorical(logits=model(x)).sample()

    timings = {}
    for name, fn in [("fisher_ext", per_example_sqnorms), ("torch.func", per_example_sqnorms_torch_func)]:
        fn(model, x, y)  # warm-up
        start = time.perf_counter()
        result = fn(model, x, y)
        timings[name] = (time.perf_counter() - start, result)

    ours, ref = timings["fisher_ext"][1], timings["torch.func"][1]
    rel = ((ours - ref).abs() / ref).max().item()
    print(f"model: small CNN ({sum(p.numel() for p in model.parameters())} parameters), batch {args.batch}, "
          f"device {args.device}")
    print(f"Tr(F) estimate (1 sampled label per example): {ours.mean().item():.6g} "
          f"(standard error {ours.std().item() / args.batch ** 0.5:.3g})")
    print(f"per-example ||g_n||^2: min {ours.min().item():.4g}, median {ours.median().item():.4g}, "
          f"max {ours.max().item():.4g}")
    print(f"max relative difference to torch.func per-example gradients: {rel:.2e}")
    for name, (seconds, _) in timings.items():
        print(f"  {name:>10}: {seconds * 1e3:8.1f} ms (forward + backward + per-example norms)")
    if rel > 1e-3:
        raise SystemExit(f"fisher_ext and torch.func disagree (max relative difference {rel:.2e})")


if __name__ == "__main__":
    main()
