"""optimize()/restore() mechanics on a stand-in rule, independent of any op."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vitkernels import replace
from vitkernels.replace import FusedModule, Rule


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.randn(4))
        self.register_buffer("shift", torch.randn(4))
        self.register_buffer("tmp", torch.zeros(1), persistent=False)
        self.gain = 2.0

    def forward(self, x):
        return self.proj(x) * self.scale * self.gain + self.shift


class FusedToy(FusedModule):
    op = "attention"

    def forward(self, x):
        # the same math, written differently
        return torch.addmm(self.proj.bias, x, self.proj.weight.t()) * (self.scale * self.gain) + self.shift


@pytest.fixture
def toy_rule():
    rule = Rule("test Toy", "attention", lambda m: isinstance(m, Toy), lambda m, b: FusedToy(m, b))
    replace._load_rules()
    replace._RULES.append(rule)
    yield rule
    replace._RULES.remove(rule)


def _model():
    return nn.Sequential(Toy(), nn.ReLU(), nn.Sequential(Toy(), nn.Linear(4, 2)))


def test_optimize_keeps_state_dict_and_outputs(toy_rule):
    model = _model()
    x = torch.randn(3, 4)
    ref = model(x)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    report = replace.optimize(model, backend="torch", ops=("attention",))
    assert [r.path for r in report.replaced] == ["0", "2.0"]
    assert all(r.backend == "torch" for r in report.replaced)
    assert isinstance(model[0], FusedToy) and isinstance(model[2][0], FusedToy)
    new_sd = model.state_dict()
    assert list(new_sd) == list(sd)
    for k in sd:
        assert torch.equal(new_sd[k], sd[k]), k
    torch.testing.assert_close(model(x), ref)
    assert "replaced 2.0 (Toy) -> attention [torch]" in str(report)


def test_ops_filter_and_idempotence(toy_rule):
    model = _model()
    assert replace.optimize(model, ops=("patch_embed",)).count() == 0
    assert replace.optimize(model, ops=("attention",)).count() == 2
    assert replace.optimize(model, ops=("attention",)).count() == 0  # already fused
    with pytest.raises(ValueError, match="unknown ops"):
        replace.optimize(model, ops=("conv",))


def test_restore_carries_trained_and_loaded_tensors(toy_rule):
    model = _model()
    replace.optimize(model, ops=("attention",))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    other = _model()
    other.load_state_dict(model.state_dict())  # checkpoint from the optimized model
    model.eval()
    x = torch.randn(3, 4)
    out = model(x)
    assert replace.restore(model) == 2
    assert type(model[0]) is Toy and type(model[2][0]) is Toy
    assert not model[0].training
    torch.testing.assert_close(model(x), out)
    torch.testing.assert_close(other.eval()(x), out)


def test_restore_after_module_replaced_parameter(toy_rule):
    model = _model()
    replace.optimize(model, ops=("attention",))
    model[0].scale = nn.Parameter(torch.full((4,), 3.0))  # re-assigned on the fused module
    replace.restore(model)
    assert torch.equal(model[0].scale, torch.full((4,), 3.0))


def test_root_module_cannot_be_replaced_in_place(toy_rule):
    with pytest.raises(ValueError, match="wrap it in a container"):
        replace.optimize(Toy(), ops=("attention",))
