"""The realistic models (a GPT-style decoder, ResNet-18) on the capture route, exact.

The GPT has what a language model has and what used to send it to the slow routes: an lm
head tied to the token embedding (one parameter, two modules), a position embedding
called on ``torch.arange(T)`` without a batch dimension, causal attention through
``scaled_dot_product_attention``, and a per-token loss on ``(B, T, V)`` logits. Every
check is against explicit per-sample gradients in float64.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sgdgeom.diffusion import DiffusionMatrix
from sgdgeom.errors import InputError
from sgdgeom.models import build_model
from sgdgeom.optim import DiffusionMetricSGD
from sgdgeom.persample import CoverageError, per_sample_loss
from tests.reference import assert_close, dense_diffusion, per_sample_gradients

VOCAB, CONTEXT, BATCH = 11, 5, 4


def tiny_gpt(context: int = CONTEXT) -> nn.Module:
    torch.manual_seed(0)
    return build_model("gpt", (context,), VOCAB, dim=8, depth=1, heads=2).double()


def tokens(batch: int = BATCH, context: int = CONTEXT) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (
        torch.randint(0, VOCAB, (batch, context), generator=g),
        torch.randint(0, VOCAB, (batch, context), generator=g),
    )


def centred_gram(G: torch.Tensor) -> torch.Tensor:
    centred = G - G.mean(0)
    return centred @ centred.T / len(G)


def test_gpt_is_exact_on_the_capture_route_with_its_tied_head_and_positions():
    model, (x, y) = tiny_gpt(), tokens()
    assert model.head.weight is model.tok.weight
    D = DiffusionMatrix(model, "cross_entropy", (x, y))
    assert D.route == "capture"
    rules = {type(layer.rule).__name__ for layer in D.products.layers}
    assert "FallbackRule" not in rules  # every layer has its own rule
    G = per_sample_gradients(model, per_sample_loss("cross_entropy"), x, y)
    assert_close(D.gram(), centred_gram(G), what="GPT: Gram")
    assert_close(D.dense(), dense_diffusion(G), what="GPT: D")
    space = D.space
    norms = torch.stack([G[:, space.slice(n)].square().sum(1) for n in space.names], 1)
    assert_close(D.products.sq_norms(), norms, what="GPT: squared norms")


@pytest.mark.parametrize("inverse", ["weak", "exact"])
def test_metric_steps_on_the_gpt_equal_the_dense_updates(inverse):
    """The checked first step and a fused second one, each against the dense update."""
    model, (x, y) = tiny_gpt(), tokens()
    opt = DiffusionMetricSGD(model, lr=0.5, inverse=inverse)
    loss = per_sample_loss("cross_entropy")
    for _ in range(2):
        twin = tiny_gpt()  # the optimizer's hooks stay on the model: a fresh twin
        twin.load_state_dict(model.state_dict())
        G = per_sample_gradients(twin, loss, x, y)
        D, g_bar = dense_diffusion(G), G.mean(0)
        eps = 0.5 / float(torch.linalg.eigvalsh(D)[-1])
        eye = torch.eye(len(D), dtype=torch.float64)
        step = (
            torch.linalg.solve(eye + eps * D, g_bar)
            if inverse == "exact"
            else g_bar - eps * D @ g_bar
        )
        start = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        opt.zero_grad()
        loss(model(x), y).mean().backward()
        opt.step()
        after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        assert_close(after, start - 0.5 * step, what=f"GPT metric step ({inverse})")
    assert opt.fused and model.tok.weight.grad is None  # the second step ran fused


def test_positions_of_shape_one_by_t_take_the_same_path():
    model, (x, y) = tiny_gpt(), tokens()

    class Ids(nn.Module):  # position ids (1, T), as Hugging Face's GPT-2 writes them
        def __init__(self, gpt: nn.Module) -> None:
            super().__init__()
            self.gpt = gpt

        def forward(self, x):
            positions = torch.arange(x.shape[1])[None]
            h = self.gpt.blocks(self.gpt.tok(x) + self.gpt.pos(positions))
            return self.gpt.head(self.gpt.norm(h))

    wrapped = Ids(model)
    D = DiffusionMatrix(wrapped, "cross_entropy", (x, y), route="capture")
    G = per_sample_gradients(wrapped, per_sample_loss("cross_entropy"), x, y)
    assert_close(D.gram(), centred_gram(G), what="positions (1, T)")


def test_positions_as_long_as_the_batch_are_refused_with_the_cause():
    """``torch.arange(T)`` with T = B reads as a batch: the coverage check refuses it and
    says how to write the positions; the automatic route is exact anyway."""
    model, (x, y) = tiny_gpt(context=BATCH), tokens(context=BATCH)
    with pytest.raises(CoverageError, match=r"pos\.weight.*torch\.arange\(T\)\[None\]"):
        DiffusionMatrix(model, "cross_entropy", (x, y), route="capture")
    with pytest.warns(UserWarning):
        D = DiffusionMatrix(model, "cross_entropy", (x, y))
    G = per_sample_gradients(model, per_sample_loss("cross_entropy"), x, y)
    assert_close(D.gram(), centred_gram(G), what="positions T = B, generic")


def test_per_token_cross_entropy_is_the_mean_over_each_samples_tokens():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 7, generator=g)
    targets = torch.randint(0, 7, (3, 6), generator=g)
    targets[0, 4:] = -100  # padding
    targets[2, :] = -100  # a sample of padding only: no token, loss 0
    losses = per_sample_loss("cross_entropy")(logits, targets)
    for i in range(3):
        kept = targets[i] != -100
        expected = F.cross_entropy(logits[i][kept], targets[i][kept]) if kept.any() else 0.0
        assert float(losses[i]) == pytest.approx(float(expected), rel=1e-6)
    # torch's own layout (B, V, T) gives the same losses
    assert_close(per_sample_loss("cross_entropy")(logits.transpose(1, 2), targets), losses)
    # the same through F.cross_entropy and nn.CrossEntropyLoss, their options kept
    smoothed = per_sample_loss(nn.CrossEntropyLoss(label_smoothing=0.1))(logits, targets)
    assert smoothed.shape == (3,) and not torch.allclose(smoothed, losses)
    assert_close(per_sample_loss(F.cross_entropy)(logits, targets), losses)


def test_an_ambiguous_logit_layout_is_refused():
    with pytest.raises(InputError, match="cannot tell the classes from the positions"):
        per_sample_loss("cross_entropy")(torch.randn(2, 5, 5), torch.randint(0, 5, (2, 5)))


@pytest.mark.parametrize("name", ["resnet18-gn", "resnet18-bn"])
def test_resnet18_is_exact_on_the_capture_route(name):
    """ResNet-18 at width 4 on 16x16 images, 2x2 in the last stage (the BatchNorm original
    in eval mode, with running statistics away from their defaults)."""
    torch.manual_seed(0)
    model = build_model(name, (3, 16, 16), 5, width=4).double()
    if name.endswith("bn"):
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
        model.eval()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 3])
    D = DiffusionMatrix(model, "cross_entropy", (x, y))
    assert D.route == "capture"
    G = per_sample_gradients(model, per_sample_loss("cross_entropy"), x, y)
    assert_close(D.gram(), centred_gram(G), what=f"{name}: Gram")
    v = torch.randn(D.space.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    centred = G - G.mean(0)  # D v without the d x d matrix (d = 44k here)
    assert_close(D @ v, centred.T @ (centred @ v) / len(G), what=f"{name}: D v")


def test_resnet18_with_batchnorm_in_train_mode_is_refused_by_name():
    model = build_model("resnet18-bn", (3, 8, 8), 5, width=4)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    with pytest.raises(Exception, match="stem_norm"):
        DiffusionMatrix(model, "cross_entropy", (x, y))


class FlattenedBatch(nn.Module):
    """A Linear on the batch flattened into its first axis, ``(B T, F)``, and an Embedding
    on flattened token ids: neither input is shared by the samples, so the capture must
    not repeat it (the model's forward is left as it is) and refuses the layer."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, 3)
        self.lin = nn.Linear(3, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, ids):
        b, t = ids.shape
        h = self.tok(ids.reshape(-1))  # (B T, 3)
        return self.out(torch.tanh(self.lin(h)).reshape(b, t, -1).mean(1))


def test_a_batch_flattened_into_the_first_axis_is_refused_and_the_forward_kept():
    torch.manual_seed(0)
    model = FlattenedBatch().double()
    x, y = torch.randint(0, VOCAB, (BATCH, 3)), torch.randint(0, 2, (BATCH,))
    with pytest.raises(CoverageError, match="flattened into its first axis"):
        DiffusionMatrix(model, "cross_entropy", (x, y), route="capture")
    with pytest.warns(UserWarning):
        D = DiffusionMatrix(model, "cross_entropy", (x, y))
    G = per_sample_gradients(model, per_sample_loss("cross_entropy"), x, y)
    assert_close(D.gram(), centred_gram(G), what="flattened batch, generic")
    # the optimizer's hooks leave the training forward as it is and refuse at the check
    opt = DiffusionMetricSGD(model, lr=0.1)
    expected = model(x).detach().clone()
    logits = model(x)
    assert torch.equal(logits.detach(), expected)
    nn.functional.cross_entropy(logits, y).backward()
    with pytest.raises(CoverageError):
        opt.step()


def test_positions_as_long_as_a_multiple_of_the_batch_stay_on_the_capture_route():
    """``torch.arange(T)`` with T = 2 B: a length a flattened batch could have, told apart
    by its values."""
    model, (x, y) = tiny_gpt(context=2 * BATCH), tokens(context=2 * BATCH)
    D = DiffusionMatrix(model, "cross_entropy", (x, y), route="capture")
    G = per_sample_gradients(model, per_sample_loss("cross_entropy"), x, y)
    assert_close(D.gram(), centred_gram(G), what="positions T = 2 B")
