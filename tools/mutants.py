"""Deliberate bugs that the test suite must catch: each mutant edits one line of fisher_ext,
runs the tests that should notice, and is restored. Prints killed / survived and the score.

    python tools/mutants.py [--only SUBSTRING]

A targeted complement to a general mutation tool (mutmut, cosmic-ray): these are the bugs that
earlier versions of the suite let through, and the ones a per-example-norm package most needs to
catch (scaling, layouts, label draws, replay of the watched pass).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["python_tests/test_monitor.py", "python_tests/test_cases.py", "python_tests/test_rules_linear.py",
        "python_tests/test_rules_conv.py", "python_tests/test_rules_norm.py", "python_tests/test_rules_rerun.py",
        "python_tests/test_rules_registry.py"]
LIKELIHOODS = ["python_tests/test_likelihoods.py"]
PENALTY = ["python_tests/test_penalty.py", "python_tests/test_penalty_replay.py",
           "python_tests/test_penalty_training.py"]
DISTRIBUTED = ["python_tests/test_distributed.py"]

# (description, file, text, replacement, tests)
MUTANTS = [
    ("categorical loss averages a sequence's tokens", "fisher_ext/likelihoods.py",
     "return per_token.reshape(output.shape[0], -1).sum(1)", "return per_token.reshape(output.shape[0], -1).mean(1)",
     FAST),
    ("Gaussian loss ignores its variance", "fisher_ext/likelihoods.py",
     "/ (2 * self.variance)", "/ 2", FAST),
    ("Gaussian draws scaled instead of shifted", "fisher_ext/likelihoods.py",
     "return mean + self.variance ** 0.5 * noise", "return mean // self.variance ** 0.5 * noise", LIKELIHOODS),
    ("Gaussian draws with the wrong spread", "fisher_ext/likelihoods.py",
     "return mean + self.variance ** 0.5 * noise", "return mean + self.variance ** 0.5 ** noise", LIKELIHOODS),
    ("Bernoulli accepts a 0-d output", "fisher_ext/likelihoods.py",
     '_check_batched(output, "logits (N, *)", 1)', '_check_batched(output, "logits (N, *)", 0)', LIKELIHOODS),
    ("categorical label shape compared by order", "fisher_ext/likelihoods.py",
     "if labels.shape != output.shape[:-1]:", "if labels.shape < output.shape[:-1]:", LIKELIHOODS),
    ("integer outputs accepted", "fisher_ext/likelihoods.py",
     "if not isinstance(output, torch.Tensor) or not output.is_floating_point():",
     "if not isinstance(output, torch.Tensor) and not output.is_floating_point():", LIKELIHOODS),
    ("standard error divides by N", "fisher_ext/monitor.py",
     "self.per_example.std() / math.sqrt(n)", "self.per_example.std() / n", FAST),
    ("probe reverses its chunks", "fisher_ext/monitor.py",
     "parts.append(r.per_example)", "parts.insert(0, r.per_example)", FAST),
    ("exact estimator drops the class probabilities", "fisher_ext/estimators.py",
     "v = v.double() * (weight.double() if weight is not None else 1.0 / len(draws))",
     "v = v.double() * (1.0 / len(draws))", FAST),
    ("batch dimension guessed as 0", "fisher_ext/capture.py",
     "return found[0] if len(found) == 1 else None", "return 0", FAST),
    ("batch dimension: first candidate of size N", "fisher_ext/capture.py",
     "if reached and all(r.nonzero().flatten().tolist() == [i] for i, r in reached):", "if True:", FAST),
    ("linear rule ignores the batch dim", "fisher_ext/rules/shared.py",
     "return tuple(t.movedim(d, 0) if d else t for t in tensors)", "return tensors", FAST),
    ("embedding counts the padding row", "fisher_ext/rules/embedding.py",
     "        same = same & keep.unsqueeze(2) & keep.unsqueeze(1)", "        same = same", FAST),
    ("layer norm without eps", "fisher_ext/rules/norm.py",
     "module.normalized_shape, None, None, module.eps)", "module.normalized_shape, None, None)", FAST),
    ("conv transpose without the swap", "fisher_ext/rules/conv.py",
     "out = _conv(module, names, g.to(x.dtype), x)", "out = _conv(module, names, x, g.to(x.dtype))", FAST),
    ("fallback keeps every example's gradient in every cotangent", "fisher_ext/rules/functional.py",
     "c.movedim(d + 1, 1)[torch.arange(len(rows)), rows] = g.movedim(d, 0)[rows]", "c[:] = g", FAST),
    ("tying through another module's forward not refused", "fisher_ext/capture.py",
     "        self._refuse_foreign_uses(used)\n", "", FAST),
    ("BatchNorm in train mode not refused", "fisher_ext/rules/norm.py",
     "module.training or module.running_mean is None)", "module.running_mean is None)", FAST),
    ("label draws from the global stream", "fisher_ext/estimators.py",
     "self._own[device] = torch.Generator(device).manual_seed(self.seed)",
     "self._own[device] = torch.default_generator", FAST + PENALTY),
    ("penalty's free norms not rescaled from the mean loss", "fisher_ext/penalty/objectives.py",
     "scale=float(n))", "scale=1.0)", PENALTY),
    ("finite difference without replayed ReLU gates", "fisher_ext/penalty/replay.py",
     "    return _GatedReLU.apply(args[0], recorded, _inplace(func, args, kwargs))", "    return func(*args, **kwargs)",
     PENALTY),
    ("finite difference radius 100x", "fisher_ext/penalty/methods.py",
     "base = 1e-6 if params[0].dtype == torch.float64 else 1e-3",
     "base = 1e-4 if params[0].dtype == torch.float64 else 1e-1", PENALTY),
    ("finite difference without the replayed random state", "fisher_ext/penalty/methods.py",
     "with rerun.rng.replayed(), rerun.buffers.replayed():", "with rerun.buffers.replayed():", PENALTY),
    ("finite difference on the updated buffers", "fisher_ext/penalty/methods.py",
     "with rerun.rng.replayed(), rerun.buffers.replayed():", "with rerun.rng.replayed():", PENALTY),
    ("every=k counts from the wrong step", "fisher_ext/penalty/fisher_penalty.py",
     "return (step - 1) % self.every == 0", "return step % self.every == 0", PENALTY),
    ("self-check tolerance ignored", "fisher_ext/penalty/methods.py",
     "return self.relative_error <= tolerance and self.training_shift <= tolerance", "return True", PENALTY),
    ("max-pool replay ignores the recorded indices", "fisher_ext/penalty/replay.py",
     "    return ((values, indices) if _with_indices(func, kwargs) else values), (indices,)",
     "    return ((values, indices) if _with_indices(func, kwargs) else values), (indices * 0,)", PENALTY),
    ("across processes, each rank's share not scaled for DDP's average", "fisher_ext/distributed.py",
     "return self.world * self.n / self.total", "return self.n / self.total", DISTRIBUTED),
    ("across processes, ranks weighted equally whatever their batch sizes", "fisher_ext/distributed.py",
     "flat = torch.cat([p.to(dtype) * self.n for p in parts]", "flat = torch.cat([p.to(dtype) * 1 for p in parts]",
     DISTRIBUTED),
    ("finite difference shifted along the rank's own gbar", "fisher_ext/penalty/methods.py",
     "direction = gbar if direction is None else direction", "direction = gbar", DISTRIBUTED),
    ("the gradient written past DDP's reducer", "fisher_ext/distributed.py",
     "    if ddp is None:\n        add_into_grads(params, grads)",
     "    if True:\n        add_into_grads(params, grads)", DISTRIBUTED),
    ("the monitor's Tr(F) left per rank", "fisher_ext/monitor.py",
     "        if self.group is None:\n            return result", "        if True:\n            return result",
     DISTRIBUTED),
]


def run(tests: list[str]) -> bool:
    """True if the tests fail (the mutant is killed)."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    return subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode != 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="")
    args = parser.parse_args()
    killed = survived = 0
    for desc, path, text, replacement, tests in MUTANTS:
        if args.only not in desc:
            continue
        full = os.path.join(ROOT, path)
        with open(full) as f:
            source = f.read()
        if source.count(text) != 1:
            print(f"STALE    {desc}: the text to mutate is not in {path} exactly once")
            survived += 1
            continue
        start = time.time()
        try:
            with open(full, "w") as f:
                f.write(source.replace(text, replacement))
            dead = run(tests)
        finally:
            with open(full, "w") as f:
                f.write(source)
        killed, survived = killed + dead, survived + (not dead)
        print(f"{'killed  ' if dead else 'SURVIVED'} {desc} ({time.time() - start:.0f} s)", flush=True)
    print(f"score: {killed}/{killed + survived} killed")
    sys.exit(1 if survived else 0)


if __name__ == "__main__":
    main()
