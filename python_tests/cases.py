"""The model patterns real training code uses, as data: every Tr(F), monitor and penalty test
runs over this table. Each case gives the oracle's number or raises the named error."""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

N = 5


@dataclass
class Case:
    id: str
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], tuple]
    classes: int = 4
    tokens: int | None = None  # (N, T, C) outputs: labels per token
    error: str | None = None  # a regex of the UnsupportedModuleError it must raise, or None: the oracle's number
    batch_dim: int = 0  # of the inputs


def vectors(g):
    return (torch.randn(N, 6, generator=g, dtype=torch.float64),)


def images(g):
    return (torch.randn(N, 3, 8, 8, generator=g, dtype=torch.float64),)


def sequences(g, first=False):
    x = torch.randn(N, 7, 6, generator=g, dtype=torch.float64)
    return (x.transpose(0, 1).contiguous(),) if first else (x,)


def token_ids(g):
    t = torch.randint(1, 11, (N, 7), generator=g)
    t[0, -2:] = 0  # padding
    return (t,)


def mlp():
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(inplace=True), nn.Linear(16, 4))


def cnn(norm):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))


def batchnorm_eval():
    model = cnn(nn.BatchNorm2d)
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


def frozen(model, *names):
    for name in names:
        model.get_parameter(name).requires_grad_(False)
    return model


class Transformer(nn.Module):
    """Embedding + self-attention (raw projection parameters, out_proj used directly) + LayerNorm + head."""

    def __init__(self, batch_first=True):
        super().__init__()
        self.embed = nn.Embedding(11, 8, padding_idx=0)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, tokens):
        h = self.embed(tokens)
        if not self.attn.batch_first:
            h = h.transpose(0, 1)
        a = self.attn(h, h, h, need_weights=False)[0]
        h = self.norm(h + a)
        if not self.attn.batch_first:
            h = h.transpose(0, 1)
        return self.head(h)


class Recurrent(nn.Module):
    """A classifier reading the last hidden state h_n of an LSTM / GRU / RNN."""

    def __init__(self, kind, batch_first):
        super().__init__()
        self.rnn = kind(6, 5, num_layers=2, batch_first=batch_first)
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        _, h = self.rnn(x)
        h = h[0] if isinstance(h, tuple) else h
        return self.head(h[-1])


class Sub(nn.Module):
    """A submodule with a nested output: a dict, a list or a dataclass."""

    @dataclass
    class Out:
        main: torch.Tensor
        extra: list

    def __init__(self, kind):
        super().__init__()
        self.kind, self.a, self.b = kind, nn.Linear(6, 4), nn.Linear(6, 4)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        return {"a": a, "b": [b]} if self.kind == "dict" else [a, (b,)] if self.kind == "list" \
            else Sub.Out(a, [b])


class NestedOutput(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.sub = Sub(kind)

    def forward(self, x):
        out = self.sub(x)
        a, b = (out["a"], out["b"][0]) if isinstance(out, dict) else (out[0], out[1][0]) \
            if isinstance(out, list) else (out.main, out.extra[0])
        return a * torch.tanh(b)


class Tied(nn.Module):
    """Embedding weight reused for the logits (F.linear), the usual language-model tying."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.body = nn.Linear(4, 4)

    def forward(self, tokens):
        return F.linear(torch.tanh(self.body(self.embed(tokens))), self.embed.weight)[..., :4]


class ParentUsesChild(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 4)

    def forward(self, x):
        return self.lin(x) + x[:, :4] @ self.lin.weight[:, :4].T


class Checkpointed(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        self.reentrant = reentrant
        self.pre, self.a, self.b, self.head = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = checkpoint(lambda t: torch.tanh(self.b(torch.tanh(self.a(t)))), torch.tanh(self.pre(x)),
                       use_reentrant=self.reentrant)
        return self.head(h)


class Routed(nn.Module):
    """Mixture of experts: each expert sees only its examples."""

    def __init__(self):
        super().__init__()
        self.e0, self.e1 = nn.Linear(6, 4), nn.Linear(6, 4)

    def forward(self, x):
        out = torch.empty(x.shape[0], 4, dtype=x.dtype)
        pick = x[:, 0] > 0
        return out.masked_scatter(pick[:, None], self.e0(x[pick])).masked_scatter(~pick[:, None], self.e1(x[~pick]))


class Scale(nn.Module):
    """A user layer with a rule registered for it in the tests: y = x * scale."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 6))

    def forward(self, x):
        return x * self.scale


def tied_parameter():
    shared = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 4))
    shared[2].weight = shared[0].weight
    return shared


def compiled_in_place():
    model = mlp()
    model.compile()
    return model


def batchnorm_train(affine=True, freeze=False):
    model = cnn(lambda c: nn.BatchNorm2d(c, affine=affine))
    return frozen(model, "1.weight", "1.bias") if freeze else model


CASES = [
    Case("mlp", mlp, vectors),
    Case("cnn_groupnorm", lambda: cnn(lambda c: nn.GroupNorm(2, c)), images),
    Case("cnn_batchnorm_eval", batchnorm_eval, images),
    Case("conv_reflect_padding", lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
                                                       nn.Flatten(), nn.Linear(4 * 64, 4)), images),
    Case("conv_transpose", lambda: nn.Sequential(nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1,
                                                                    groups=1), nn.ReLU(),
                                                 nn.ConvTranspose2d(4, 4, 2, stride=1, groups=2, dilation=2),
                                                 nn.Flatten(), nn.Linear(4 * 18 * 18, 4)), images),
    Case("transformer", Transformer, token_ids, tokens=7),
    Case("transformer_seq_first", lambda: Transformer(batch_first=False), token_ids, tokens=7),
    Case("torch_compile", lambda: torch.compile(mlp()), vectors),
    Case("module_compile", compiled_in_place, vectors),
    Case("bitfit", lambda: frozen(mlp(), "0.weight", "2.weight"), vectors),
    Case("frozen_bias", lambda: frozen(mlp(), "0.bias"), vectors),
    Case("frozen_norm_weight", lambda: frozen(cnn(lambda c: nn.GroupNorm(2, c)), "1.weight"), images),
    Case("lstm_h_n", lambda: Recurrent(nn.LSTM, True), sequences),
    Case("gru_seq_first_h_n", lambda: Recurrent(nn.GRU, False), lambda g: sequences(g, first=True), batch_dim=1),
    Case("rnn_h_n", lambda: Recurrent(nn.RNN, True), sequences),
    Case("dict_output", lambda: NestedOutput("dict"), vectors),
    Case("list_output", lambda: NestedOutput("list"), vectors),
    Case("dataclass_output", lambda: NestedOutput("dataclass"), vectors),
    Case("checkpoint", lambda: Checkpointed(False), vectors),
    Case("user_rule", lambda: nn.Sequential(Scale(), nn.Linear(6, 4)), vectors),
    Case("tied_embedding", Tied, token_ids, tokens=7, error=r"embed\.weight: used by the forward of the model as well"),
    Case("tied_parameter", tied_parameter, vectors, error=r"2\.weight: the same tensor as 0\.weight"),
    Case("parent_uses_child_weight", ParentUsesChild, vectors, error=r"lin\.weight: used by the forward of the model"),
    Case("weight_norm", lambda: nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(6, 4))), vectors,
         error="parametrized weights"),
    Case("spectral_norm", lambda: nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(6, 4))), vectors,
         error="parametrized weights"),
    Case("batchnorm_train", batchnorm_train, images, error="BatchNorm2d.*batch's statistics"),
    Case("batchnorm_train_no_affine", lambda: batchnorm_train(affine=False), images,
         error="BatchNorm2d.*batch's statistics"),
    Case("batchnorm_train_frozen_affine", lambda: batchnorm_train(freeze=True), images,
         error="BatchNorm2d.*batch's statistics"),
    Case("checkpoint_reentrant", lambda: Checkpointed(True), vectors, error="use_reentrant=False"),
    Case("routed_experts", Routed, vectors, error="holds the batch.s 5 examples one by one"),
    Case("module_called_twice", lambda: (lambda lin: nn.Sequential(lin, nn.Tanh(), lin))(nn.Linear(6, 6)), vectors,
         classes=6, error="registered twice"),
    Case("embedding_max_norm", lambda: nn.Sequential(nn.Embedding(11, 4, max_norm=1.0), nn.Flatten(),
                                                     nn.Linear(28, 4)), token_ids, error="max_norm"),
]
CASES_BY_ID = {c.id: c for c in CASES}


def build(case: Case, seed: int = 0):
    """(model in float64, inputs, labels) for a case."""
    torch.manual_seed(seed)
    model = case.build()
    target = getattr(model, "_orig_mod", model)
    target.double()
    g = torch.Generator().manual_seed(seed + 1)
    inputs = case.inputs(g)
    shape = (N, case.tokens) if case.tokens else (N,)
    labels = torch.randint(case.classes, shape, generator=g)
    return model, inputs, labels


def per_example_losses(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N,) cross-entropy of each example, summed over its tokens (batch-first outputs)."""
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), labels.reshape(-1), reduction="none").reshape(N, -1).sum(1)


def mean_ce(labels: torch.Tensor):
    """The training loss of the cases: cross-entropy summed over tokens, averaged over examples."""
    return lambda out: F.cross_entropy(out.reshape(-1, out.shape[-1]), labels.reshape(-1), reduction="sum") / N


def oracle(case: Case, model: nn.Module, inputs: tuple, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """{trainable parameter name: (N,) ||d l_n / d p||^2}, one ordinary backward per example, with
    the loss written out here (cross-entropy summed over an example's tokens)."""
    import copy
    model = copy.deepcopy(getattr(model, "_orig_mod", model))
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    out = {k: torch.zeros(N, dtype=torch.float64) for k in params}
    for n in range(N):
        logits = model(*(a.narrow(case.batch_dim, n, 1) for a in inputs))
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[n:n + 1].reshape(-1), reduction="sum")
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for k, gr in zip(params, grads):
            if gr is not None:
                out[k][n] = gr.double().square().sum()
    return out
