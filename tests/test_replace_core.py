"""optimize()/restore() mechanics on a stand-in rule, independent of any op.

The fused module is the original instance with its class swapped for a subclass
whose forward runs the fused math: the tests check what that gives by
construction (state_dict, methods, attributes, hooks, sharing, isinstance,
pickling, scripting, tracing) and the optimize API and report.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from vitkernels import replace
from vitkernels.replace import FusedModule, Plan, Rule, is_fused, summarise_paths
from vitkernels.replace._match import plan_for, qualname, random_input


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.randn(4))
        self.register_buffer("shift", torch.randn(4))
        self.register_buffer("tmp", torch.zeros(1), persistent=False)
        self.gain = 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * self.scale * self.gain + self.shift

    def doubled_gain(self) -> float:
        return 2 * self.gain

    @property
    def width(self) -> int:
        return self.proj.in_features


class FusedToy(FusedModule):
    _vk_op = "attention"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._vk_base_forward(x)
        return self._vk_forward(x)

    @torch.jit.unused
    def _vk_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.fx.Proxy) and x.ndim != 2:
            return self._vk_base_forward(x)
        # the same math, written differently
        return torch.addmm(self.proj.bias, x, self.proj.weight.t()) * (self.scale * self.gain) + self.shift


class ToyNewMethod(Toy):
    def extra(self) -> int:
        return 1


class ToyOtherMath(Toy):
    def forward(self, x):
        return 2.0 * super().forward(x)


class ToySameMath(Toy):
    def forward(self, x):
        return self.shift + self.gain * self.scale * self.proj(x)


def _build(module: nn.Module) -> Plan | str:
    return plan_for(
        module, frozenset({qualname(Toy)}), FusedToy, None, lambda m: (random_input((3, 4), m),)
    )


@pytest.fixture(autouse=True)
def toy_rule():
    rule = Rule("test Toy", "attention", lambda m: isinstance(m, Toy), _build)
    replace._load_rules()
    replace._RULES.insert(0, rule)
    yield rule
    replace._RULES.remove(rule)


def _model():
    return nn.Sequential(Toy(), nn.ReLU(), nn.Sequential(Toy(), nn.Linear(4, 2)))


def test_optimize_keeps_state_dict_and_outputs():
    model = _model()
    x = torch.randn(3, 4)
    ref = model(x)
    sd = model.state_dict(keep_vars=True)
    report = replace.optimize(model, backend="torch", ops=("attention",))
    assert [r.path for r in report.replaced] == ["0", "2.0"]
    assert all(r.backend == "torch" for r in report.replaced)
    assert isinstance(model[0], FusedToy) and isinstance(model[2][0], FusedToy)
    new_sd = model.state_dict(keep_vars=True)
    assert list(new_sd) == list(sd)
    assert all(new_sd[k] is sd[k] for k in sd)  # the same tensors: nothing was copied
    torch.testing.assert_close(model(x), ref)
    assert "replaced 2 x Toy -> attention [torch]: 0, 2.0" in str(report)


def test_fused_module_is_the_original_instance_and_class():
    model = _model()
    first = model[0]
    replace.optimize(model, ops="attention")
    assert model[0] is first and isinstance(first, Toy) and is_fused(first)
    assert type(first).__name__ == "Toy" and type(first).__qualname__ == Toy.__qualname__
    assert first.doubled_gain() == 4.0 and first.width == 4 and first.gain == 2.0
    first.gain = 3.0  # attributes set on the fused module are the module's
    assert first.doubled_gain() == 6.0
    assert "vitkernels=attention [auto]" in repr(first)
    assert replace.restore(model) == 2
    assert type(first) is Toy and first.gain == 3.0 and "vitkernels" not in repr(first)
    assert not hasattr(first, "_vk")


def test_ops_as_a_string_filter_and_idempotence():
    model = _model()
    assert replace.optimize(model, ops="patch_embed").count() == 0
    assert replace.optimize(model, ops="attention").count() == 2
    assert replace.optimize(model, ops=("attention",)).count() == 0  # already fused


def test_optimize_api_errors_say_what_was_given():
    with pytest.raises(TypeError, match=r"optimize: expected an nn.Module to optimize in place, got str 'hello'"):
        replace.optimize("hello")
    with pytest.raises(ValueError, match=r"unknown ops \['conv'\] in ops=\('conv',\)"):
        replace.optimize(_model(), ops=("conv",))
    with pytest.raises(ValueError, match=r"unknown ops \['attn'\] in ops=\('attn',\)"):
        replace.optimize(_model(), ops="attn")  # not ['a', 't', 't', 'n']
    with pytest.raises(TypeError, match=r"optimize: ops=3; expected an op name"):
        replace.optimize(_model(), ops=3)
    with pytest.raises(ValueError, match=r"optimize\(backend='tritn'\): unknown backend"):
        replace.optimize(_model(), backend="tritn")
    with pytest.raises(TypeError, match=r"restore: expected an nn.Module, got list"):
        replace.restore([])


def test_restore_carries_trained_and_loaded_tensors():
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


def test_the_model_itself_is_replaced_in_place():
    toy = Toy()
    x = torch.randn(2, 4)
    ref = toy(x)
    report = replace.optimize(toy, ops="attention")
    assert [r.path for r in report.replaced] == [""] and is_fused(toy)
    assert "replaced Toy -> attention [auto]: <root>" in str(report)
    torch.testing.assert_close(toy(x), ref)
    assert replace.restore(toy) == 1 and type(toy) is Toy


def test_hooks_keep_firing_after_optimize_and_restore():
    model = _model()
    calls = []
    model[0].register_forward_pre_hook(lambda m, args: calls.append("pre"))
    model[0].register_forward_hook(lambda m, args, out: calls.append("post"))
    model[0].register_full_backward_hook(lambda m, gi, go: calls.append("backward"))
    x = torch.randn(2, 4, requires_grad=True)
    for step in ("eager", "optimized", "restored"):
        if step == "optimized":
            replace.optimize(model, ops="attention")
        if step == "restored":
            replace.restore(model)
        calls.clear()
        model(x).sum().backward()
        assert calls == ["pre", "post", "backward"], step


def test_a_module_used_at_two_places_stays_one_module():
    shared = Toy()
    model = nn.Sequential(shared, nn.ReLU(), nn.Sequential(shared))
    x = torch.randn(2, 4)
    ref = model(x)
    report = replace.optimize(model, ops="attention")
    assert report.count() == 1 and report.replaced[0].also_at == ["2.0"]
    assert "replaced Toy -> attention [auto]: 0 (the same modules also at 2.0)" in str(report)
    assert model[0] is model[2][0] is shared and is_fused(shared)
    assert len(list(model.parameters())) == len(list(shared.parameters())) + 0
    torch.testing.assert_close(model(x), ref)
    assert replace.restore(model) == 1
    assert model[0] is model[2][0] is shared and type(shared) is Toy


def test_pickle_deepcopy_and_save_whole_model():
    model = _model()
    replace.optimize(model, ops="attention")
    x = torch.randn(3, 4)
    for clone in (copy.deepcopy(model), _reload(model)):
        assert is_fused(clone[0]) and type(clone[0]) is type(model[0])
        torch.testing.assert_close(clone(x), model(x))
        assert replace.restore(clone) == 2 and type(clone[0]) is Toy
        torch.testing.assert_close(clone(x), model(x))


def _reload(model: nn.Module) -> nn.Module:
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_torchscript_and_fx_of_the_optimized_model():
    model = _model()
    replace.optimize(model, ops="attention")
    x = torch.randn(3, 4)
    scripted = torch.jit.script(model)  # compiles the original forward of each Toy
    torch.testing.assert_close(scripted(x), model(x))
    assert is_fused(model[0])  # scripting leaves the eager model as it was
    traced = torch.fx.symbolic_trace(model)
    assert "addmm" in traced.code  # the fused forward, traced
    torch.testing.assert_close(traced(x), model(x))


def test_subclass_overriding_the_math_is_left_unless_checked_equal():
    model = nn.Sequential(ToyNewMethod(), ToyOtherMath(), ToySameMath())
    x = torch.randn(3, 4)
    ref = model(x)
    report = replace.optimize(model, ops="attention")
    replaced = {r.source: r for r in report.replaced}
    assert set(replaced) == {"ToyNewMethod", "ToySameMath"}, str(report)
    assert replaced["ToyNewMethod"].checked == ""  # nothing of Toy's overridden
    assert "ToySameMath overrides forward of Toy" in replaced["ToySameMath"].checked
    assert "checked at optimize time" in replaced["ToySameMath"].checked
    (left,) = report.left
    assert left.source == "ToyOtherMath" and type(model[1]) is ToyOtherMath
    assert "overrides forward of Toy, and the fused op computes another function" in left.reason
    torch.testing.assert_close(model(x), ref)


def test_the_check_leaves_the_global_rng_alone():
    model = nn.Sequential(ToySameMath())
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    assert replace.optimize(model, ops="attention").replaced[0].checked
    assert torch.equal(torch.rand(3), want)


class MyAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(4, 12)

    def forward(self, x):
        return x


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = MyAttention()

    def forward(self, x):
        return self.attn(x)


def test_report_groups_reasons_and_lists_unrecognised_attention():
    model = nn.Sequential(*[Block() for _ in range(12)], *[ToyOtherMath() for _ in range(3)])
    report = replace.optimize(model, ops="attention")
    assert len(report.left) == 15
    lines = str(report).splitlines()
    assert lines[0] == "vitkernels.optimize: 0 replaced, 15 left"
    assert lines[1] == (
        "  left     12 x MyAttention: no rule recognises this attention layout: {0-11}.attn"
    )
    assert lines[2].startswith("  left     3 x ToyOtherMath: ToyOtherMath overrides forward")
    assert lines[2].endswith(": {12-14}") and len(lines) == 3
    # patch-embedding-like modules only when that op is asked for
    assert not replace.optimize(model, ops="patch_embed").left


class GPSALike(nn.Module):
    """The layout of ConViT's GPSA (timm): one qk projection beside v and a head
    count; a class name that says nothing of attention."""

    def __init__(self):
        super().__init__()
        self.num_heads = 2
        self.qk = nn.Linear(4, 8)
        self.v = nn.Linear(4, 4)

    def forward(self, x):
        return x


def test_report_lists_attention_with_a_qk_projection():
    model = nn.Sequential(GPSALike(), nn.Linear(4, 4))
    report = replace.optimize(model, ops="attention")
    assert [(e.path, e.source) for e in report.left] == [("0", "GPSALike")]
    assert "no rule recognises this attention layout" in str(report)


def test_report_lists_timm_convit_attention():
    timm = pytest.importorskip("timm")
    model = timm.create_model("convit_tiny", pretrained=False, img_size=32, patch_size=16, depth=2,
                              local_up_to_layer=1, num_classes=10)
    report = replace.optimize(model)
    assert {e.path: e.source for e in report.left} == {"blocks.0.attn": "GPSA"}
    assert "blocks.1.attn" in [e.path for e in report.replaced]  # MHSA: plain attention


def test_summarise_paths():
    assert summarise_paths([f"blocks.{i}.attn" for i in range(12)]) == "blocks.{0-11}.attn"
    assert summarise_paths(["a.0", "a.1", "a.3"]) == "a.{0-1,3}"
    levit = [f"stages.{s}.blocks.{b}.attn" for s, n in enumerate((2, 3)) for b in range(n)]
    assert summarise_paths(levit) == "stages.0.blocks.{0-1}.attn, stages.1.blocks.{0-2}.attn"
    assert summarise_paths(["p", "q", "r", "s", "t"]) == "p, q, r, s and 1 more"
