"""vitkernels.compare: the `python -m vitkernels compare` command, on CPU."""

from __future__ import annotations

import io
import json
import re

import pytest
import torch

import vitkernels
from vitkernels import compare

TINY_VIT = {
    "image_size": 32, "patch_size": 8, "num_classes": 10, "dim": 32, "depth": 2, "heads": 2,
    "dim_head": 16, "mlp_dim": 64,
}  # fmt: skip
FAST = ["--batch", "2", "--warmup", "1", "--iters", "2"]


def _table(out: str) -> dict[str, str]:
    rows = {}
    for line in out.splitlines():
        m = re.match(r"^  (\S.*?)\s{2,}(\S.*)$", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


@pytest.mark.parametrize(
    "argv, n_attention",
    [
        (["vit-pytorch:ViT", "--config", json.dumps(TINY_VIT)], 2),
        (["vit-pytorch:cvt.CvT", "--image-size", "32", "--config",
          '{"num_classes": 10, "s1_emb_dim": 16, "s2_emb_dim": 32, "s2_depth": 1, '
          '"s3_emb_dim": 32, "s3_depth": 1}'], 3),
        (["vit_b16", "--image-size", "32", "--config", '{"depth": 1, "dim": 64, "heads": 2}'],
         1),
        (["timm:crossvit_tiny_240", "--image-size", "48", "--config",
          '{"img_scale": [1.0, 1.0], "depth": [[1, 1, 0]], "embed_dim": [32, 48], '
          '"num_heads": [2, 2]}'], 2),
    ],
)  # fmt: skip
def test_compare_prints_the_table_and_agrees(argv, n_attention, capsys):
    assert compare.compare_main([*argv, *FAST]) == 0
    captured = capsys.readouterr()
    rows = _table(captured.out)
    total, per_op = re.fullmatch(r"(\d+) \((.*)\)", rows["replaced modules"]).groups()
    counts = dict(item.rsplit(" ", 1) for item in per_op.split(", "))
    assert counts["attention"] == str(n_attention)
    assert int(total) == sum(map(int, counts.values()))
    assert rows["max |optimized - eager|"].endswith(": agree")
    eager = float(rows["eager"].split()[0].replace(",", ""))
    opt = float(rows["optimized"].split()[0].replace(",", ""))
    assert eager > 0 and opt > 0
    # the printed figures are rounded: images/s to 0.1, the speed-up to 0.01
    low, high = (opt - 0.05) / (eager + 0.05) - 0.005, (opt + 0.05) / (eager - 0.05) + 0.005
    assert low <= float(rows["speed-up"].removesuffix("x")) <= high
    assert "vitkernels.optimize:" in captured.out and "float32  cpu" in captured.out
    assert "timing eager vs optimized" in captured.err and f"{1 + 2}/{1 + 2}" in captured.err


@pytest.mark.parametrize(
    "dtype, backend, model",
    [("bfloat16", "reference", "levit_128s"), ("float16", "triton", "levit_128s"),
     ("float16", "triton", "t2t_vit_14")],
)  # fmt: skip
def test_compare_dtype_and_backend_options(dtype, backend, model, capsys):
    """--dtype and --backend reach the model and the fused modules (triton under the
    interpreter on CPU); the outputs still agree within the dtype's tolerance."""
    argv = [model, "--image-size", "32" if model == "t2t_vit_14" else "64", "--dtype", dtype,
            "--backend", backend, "--config", '{"num_classes": 10}', *FAST]
    if model == "t2t_vit_14":
        # one block, narrow (the interpreter runs every kernel program in Python)
        argv[-len(FAST) - 1] = json.dumps(
            {"num_classes": 10, "depth": 1, "img_size": 32, "embed_dim": 64, "num_heads": 2, "token_dim": 32})
    else:  # one block a stage (each stage's attention and its shrink attention still run)
        argv[-len(FAST) - 1] = json.dumps({"num_classes": 10, "depth": [1, 1, 1]})
    assert compare.compare_main(argv) == 0
    out = capsys.readouterr().out
    rows = _table(out)
    assert ": agree" in rows["max |optimized - eager|"]
    assert f"{dtype}  cpu" in out
    replaced = [line for line in out.splitlines() if line.strip().startswith("replaced ") and "->" in line]
    assert replaced and all(f"[{backend}]" in line for line in replaced if "-> attention" not in line)


def test_compare_reports_disagreement(monkeypatch, capsys):
    real = vitkernels.optimize

    def broken(model, **kwargs):
        report = real(model, **kwargs)
        with torch.no_grad():
            model.mlp_head.bias.add_(1.0)  # an optimized model that computes something else
        return report

    monkeypatch.setattr(vitkernels, "optimize", broken)
    assert compare.compare_main(["vit-pytorch:ViT", "--config", json.dumps(TINY_VIT), *FAST]) == 1
    assert _table(capsys.readouterr().out)["max |optimized - eager|"].endswith("DISAGREE")


def test_low_precision_agreement_is_judged_against_float32():
    torch.manual_seed(0)
    model, side = compare.build_model("vit-pytorch:ViT", TINY_VIT)
    model = model.eval().to(torch.bfloat16)
    fused = model.__class__(**TINY_VIT).eval().to(torch.bfloat16)
    fused.load_state_dict(model.state_dict())
    vitkernels.optimize(fused, backend="torch")
    x = torch.randn(2, 3, side, side, dtype=torch.bfloat16)
    agreement = compare.check_agreement(model, fused, x)
    assert agreement.ok, agreement.describe()
    assert agreement.eager_error_fp32 is not None and agreement.optimized_error_fp32 is not None
    assert "error vs float32" in agreement.describe()
    bad = compare.Agreement(1.0, 0.1, eager_error_fp32=0.1, optimized_error_fp32=0.5)
    assert not bad.ok and "DISAGREE" in bad.describe()
    assert compare.Agreement(1.0, 0.1, eager_error_fp32=0.3, optimized_error_fp32=0.5).ok


@pytest.mark.parametrize(
    "argv, message",
    [
        (["no_such_model"], "unknown model 'no_such_model'"),
        (["vit-pytorch:ViT"], "vit-pytorch:ViT needs --config with image_size, patch_size"),
        (["vit-pytorch:Nope"], "vit-pytorch class 'Nope' is not one of"),
        (["timm:no_such_vit"], "timm has no model 'no_such_vit'"),
        (["vit_b16", "--config", '{"depht": 2}'], "unexpected keyword argument 'depht'"),
        (["vit-pytorch:ViT", "--config", "[1, 2]"], "--config must be a JSON object"),
        (["vit-pytorch:ViT", "--config", "{bad json"], "Expecting property name"),
        (["vit_b16", "--batch", "0"], "--batch must be at least 1, got 0"),
        (["vit_b16", "--iters", "-3"], "--iters must be at least 1, got -3"),
        (["vit_b16", "--ops", "attention,conv"], "--ops 'attention,conv' names conv; expected"),
        (["vit_b16", "--device", "gpu7"], "--device 'gpu7' is not a device"),
        (
            ["vit-pytorch:ViT", "--image-size", "40", "--config", json.dumps(TINY_VIT)],
            "the eager model itself fails on a (8, 3, 40, 40) float32 input on cpu",
        ),
    ],
)
def test_bad_arguments_exit_2_and_say_why(argv, message, capsys):
    assert compare.compare_main(argv) == 2
    assert message in capsys.readouterr().err


def test_progress_line():
    stream = io.StringIO()
    bar = compare.Progress("timing x", 4, stream, width=8, tty=True)
    for _ in range(4):
        bar.step()
    text = stream.getvalue()
    assert text.startswith("\rtiming x [........] 0/4")
    assert "\rtiming x [####....] 2/4" in text and text.endswith("\rtiming x [########] 4/4\n")


def test_progress_lines_without_a_terminal():
    """A log (StringIO is no terminal) gets whole lines at each quarter, no carriage returns."""
    stream = io.StringIO()
    bar = compare.Progress("timing x", 8, stream, width=8)
    for _ in range(8):
        bar.step()
    assert stream.getvalue().splitlines() == [
        f"timing x [{'#' * n}{'.' * (8 - n)}] {n}/8" for n in (0, 2, 4, 6, 8)
    ]


def test_output_tensors_flattens_nested_outputs():
    a, b, c = torch.zeros(1), torch.ones(2), torch.full((3,), 2.0)
    assert [t.numel() for t in compare.output_tensors((a, [b, {"k": c}], "text"))] == [1, 2, 3]


def test_zero_initialised_norms_are_woken_so_the_check_sees_attention():
    from vitkernels.models import create

    from vitkernels.compare import wake_zero_init_norms

    model = create("levit_128s", image_size=64, num_classes=10)
    zero = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) and not m.weight.any()]
    assert zero, "LeViT's projection BatchNorm starts at zero"
    assert wake_zero_init_norms(model) == len(zero)
    assert all(m.weight.eq(1).all() for m in zero)
    assert wake_zero_init_norms(model) == 0


# ----------------------------------------------------------------------------
# what a new user types: lists in --config, backends and devices this machine lacks


@pytest.mark.parametrize(
    "argv",
    [
        ["vit-pytorch:PiT", "--config", '{"image_size": 32, "patch_size": 8, "num_classes": 10, '
         '"dim": 32, "depth": [1, 1], "heads": 2, "mlp_dim": 32, "dim_head": 16}'],
        ["vit-pytorch:LeViT", "--config", '{"image_size": 32, "num_classes": 10, '
         '"dim": [16, 24, 32], "depth": 1, "heads": [1, 2, 2], "mlp_mult": 2, "dim_key": 8, '
         '"dim_value": 8}'],
    ],
    ids=["pit-depth-list", "levit-dim-list"],
)  # fmt: skip
def test_json_lists_become_the_tuples_vit_pytorch_expects(argv, capsys):
    assert compare.compare_main([*argv, *FAST]) == 0, capsys.readouterr().err
    assert _table(capsys.readouterr().out)["max |optimized - eager|"].endswith(": agree")


def _usage_error(argv: list[str], capsys) -> str:
    """Run compare, expect the usage/setup exit code and one error line, no traceback."""
    code = compare.compare_main([*argv, *FAST])
    err = capsys.readouterr().err
    assert code == compare.EXIT_USAGE == 2, (code, err)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


TINY = ["vit_b16", "--image-size", "32", "--config", '{"depth": 1, "dim": 64, "heads": 2}']


def test_forced_triton_without_the_interpreter_on_cpu_is_a_setup_error(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    line = _usage_error([*TINY, "--backend", "triton", "--device", "cpu"], capsys)
    assert "--backend triton" in line and "TRITON_INTERPRET=1" in line


def test_forced_cuda_without_the_extension_is_a_setup_error(capsys):
    from vitkernels import cuda

    if cuda.unavailable_reason() is None:
        pytest.skip("the CUDA extension is loaded here")
    line = _usage_error([*TINY, "--backend", "cuda"], capsys)
    assert "--backend cuda" in line and cuda.unavailable_reason() in line


def test_interpreter_bfloat16_is_a_setup_error(capsys):
    line = _usage_error([*TINY, "--backend", "triton", "--dtype", "bfloat16"], capsys)
    assert "bfloat16" in line and "interpreter" in line


@pytest.mark.parametrize(
    "argv, message",
    [
        ([*TINY, "--device", "meta"], "--device meta"),
        ([*TINY, "--device", "mps"], "--device mps"),
        (["vit_b16", "--config", "{bad"], "--config is not valid JSON"),
        (["vit-pytorch:no_module.Thing"], "vit_pytorch has no module 'no_module'"),
        (["vit-pytorch:ViT", "--config", json.dumps({**TINY_VIT, "image_size": 30})],
         "Image dimensions must be divisible by the patch size"),
        ([*TINY, "--ops", ""], "--ops '' names no op"),
    ],
)  # fmt: skip
def test_bad_input_never_shows_a_traceback(argv, message, capsys):
    assert message in _usage_error(argv, capsys)
