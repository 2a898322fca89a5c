"""fisher: sensitivity from any model, its output a tensor, tuple, dict or ModelOutput, or from a loss callable."""

import pytest
import torch
from torch import nn

import dkm_param as dp


class Wrapped(nn.Module):
    """A classifier whose output is wrapped as ``kind``: a tuple, a list or a dict."""

    def __init__(self, kind: str):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))
        self.kind = kind

    def forward(self, x):
        logits = self.body(x)
        if self.kind == "tuple":
            return logits, logits.detach().sum()
        if self.kind == "list":
            return [logits]
        if self.kind == "dict":
            return {"logits": logits, "hidden": x}
        return logits


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=1, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=50, use_cache=False,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


@pytest.mark.parametrize("kind", ["tuple", "list", "dict"])
def test_wrapped_outputs_give_the_plain_models_sensitivity(kind):
    x, y = torch.randn(8, 12, generator=torch.Generator().manual_seed(1)), torch.arange(8) % 5
    plain, wrapped = Wrapped("tensor"), Wrapped(kind)
    for batches in ([(x, y)], [x]):
        want, got = dp.fisher(plain, batches), dp.fisher(wrapped, batches)
        for name in ("0", "2"):
            torch.testing.assert_close(got[f"body.{name}"], want[f"body.{name}"], rtol=0, atol=0)


def test_a_loss_callable_is_the_mean_squared_gradient_of_that_loss():
    model = Wrapped("tensor")
    batches = [torch.randn(4, 12, generator=torch.Generator().manual_seed(i)) for i in range(3)]

    def loss(model, batch):
        return model(batch).pow(2).mean()

    got = dp.fisher(model, batches, loss=loss)
    want = torch.zeros_like(model.body[0].weight)
    for batch in batches:
        (grad,) = torch.autograd.grad(loss(model, batch), model.body[0].weight)
        want += grad.pow(2)
    torch.testing.assert_close(got["body.0"], want / 3)
    assert all(p.grad is None for p in model.parameters())


def test_causal_lm_batches_as_dicts_with_and_without_labels():
    model = tiny_llama()
    tokens = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(2))
    with_labels = dp.fisher(model, [{"input_ids": tokens, "labels": tokens}])
    own_loss = dp.fisher(model, [{"input_ids": tokens}], loss=lambda m, b: m(**b, labels=b["input_ids"]).loss)
    for name, value in with_labels.items():  # the ModelOutput's own loss, as the callable computes it
        torch.testing.assert_close(value, own_loss[name])
    predicted = dp.fisher(model, [{"input_ids": tokens}])  # no labels: the model's own argmax, per token
    q = "model.layers.0.self_attn.q_proj"
    assert predicted[q].shape == model.get_submodule(q).weight.shape
    assert (predicted[q] >= 0).all() and predicted[q].sum() > 0
    assert model.training  # left as it was


def test_outputs_without_logits_and_losses_that_are_not_scalars_are_errors():
    class Silent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return "nothing"

    model = Silent()
    model.train()
    with pytest.raises(dp.DKMError, match=r"returned str, with no logits.*loss=lambda model, batch"):
        dp.fisher(model, [torch.randn(2, 3)])
    assert model.training
    linear = nn.Linear(3, 3)
    with pytest.raises(dp.DKMError, match=r"batch 0 is a tensor of shape \(2, 3\)"):
        dp.fisher(linear, [torch.randn(2, 3)], loss=lambda m, b: m(b))
    with pytest.raises(dp.DKMError, match=r"batch 0 is a scalar that does not depend on the weights"):
        dp.fisher(linear, [torch.randn(2, 3)], loss=lambda m, b: m(b).sum().detach())
    with pytest.raises(dp.DKMError, match=r"batch 0 is a float"):
        dp.fisher(linear, [torch.randn(2, 3)], loss=lambda m, b: 1.0)
    assert all(p.grad is None for p in linear.parameters())


def test_fisher_gives_one_non_negative_tensor_per_weight():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    x = torch.randn(16, 64)
    with_labels = dp.fisher(model, [(x, torch.arange(16) % 10)])
    own = dp.fisher(model, [x, x])
    for name in ("0", "2", "4"):
        weight = model.get_submodule(name).weight
        assert with_labels[name].shape == own[name].shape == weight.shape
        assert (own[name] >= 0).all() and own[name].sum() > 0
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(dp.DKMError, match="at least one calibration batch"):
        dp.fisher(model, [])
