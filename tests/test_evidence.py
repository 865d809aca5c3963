"""Automatic dispatch between the cuda and triton backends follows the speed evidence
(vitkernels/evidence.py): a measurement of the GPU's architecture, else the
compiler-based estimate (sm_90 only), else triton first. Evidence files are
fabricated in a temporary folder; CUDA tensors exist only as fakes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from vitkernels import cuda, evidence
from vitkernels.ops import patch_embed, performer, relpos
from vitkernels.ops._dispatch import select


def _estimate(folder: Path, date: str, times: dict[tuple[str, str, str], float], arch: str = "sm_90a") -> Path:
    """An estimate file: times {(workload, pass, backend): us}."""
    from vitkernels.workloads import WORKLOADS

    calls = [{"workload": w, "op": WORKLOADS[w].op, "pass": p, "backend": b, "dtype": "bf16",
              "launches": 1, "estimate_us": t, "floor_us": 1.0, "ratio": t, "bound": "issue"}
             for (w, p, b), t in times.items()]  # fmt: skip
    path = folder / f"estimate-{arch.replace('_', '')}-{date}.json"
    path.write_text(json.dumps({"kind": "estimate", "arch": arch, "date": date, "calls": calls}))
    return path


def _measurement(folder: Path, name: str, capability: str, times: dict[tuple[str, str, str], float]) -> Path:
    """A pytest-benchmark file as bench/gpu_run.py writes it: times {(workload, pass, impl): us}."""
    benches = [{"name": f"{w} {i}", "extra_info": {"workload": w if p == "fwd" else f"{w} {p}", "impl": i,
                                                   "dtype": "bfloat16", "pass": p, "time_us": t}}
               for (w, p, i), t in times.items()]  # fmt: skip
    path = folder / name
    path.write_text(json.dumps({"machine_info": {"vitkernels": {"gpu": "NVIDIA H200", "capability": capability}},
                                "benchmarks": benches}))  # fmt: skip
    return path


@pytest.fixture
def results(tmp_path, monkeypatch):
    """An empty evidence folder that evidence.py reads (re-read on every test)."""
    monkeypatch.setenv(evidence.RESULTS_ENV, str(tmp_path))
    evidence.clear_cache()
    yield tmp_path
    evidence.clear_cache()


RELPOS_FAST = {("A1", "fwd", "cuda"): 40.0, ("A1", "fwd", "triton"): 80.0,
               ("A3", "fwd", "cuda"): 5.0, ("A3", "fwd", "triton"): 8.0}  # fmt: skip


def test_estimate_decides_both_ways_and_names_the_worst_workload(results):
    _estimate(results, "2026-11-30", {**RELPOS_FAST, ("A3", "fwd", "cuda"): 29.0})
    v = evidence.verdict("relpos_attention", "cuda", "triton", (9, 0), "fwd")
    assert not v.take
    assert v.why == f"estimate 29 us vs triton 8.0 us at A3 fwd ({results / 'estimate-sm90a-2026-11-30.json'})"
    _estimate(results, "2026-12-01", RELPOS_FAST)  # a newer estimate: cuda faster everywhere
    evidence.clear_cache()
    v = evidence.verdict("relpos_attention", "cuda", "triton", (9, 0), "fwd")
    assert v.take and "estimate at least as fast as triton at every workload (2;" in v.why
    assert "estimate-sm90a-2026-12-01.json" in v.why
    # the estimate has no fwd+bwd rows: no evidence for training calls
    v = evidence.verdict("relpos_attention", "cuda", "triton", (9, 0), "fwd+bwd")
    assert not v.take and v.why.startswith("no measurement or estimate of cuda and triton") and "triton first" in v.why


def test_a_measurement_beats_the_estimate_and_only_for_its_architecture(results):
    _estimate(results, "2026-12-01", RELPOS_FAST)
    _measurement(results, "h200-2026-11-20.json", "9.0",
                 {("A1", "fwd", "cuda"): 90.0, ("A1", "fwd", "triton"): 60.0})  # fmt: skip
    v = evidence.verdict("relpos_attention", "cuda", "triton", (9, 0), "fwd")
    assert not v.take and v.why.startswith("measured 90 us vs triton 60 us at A1 fwd (") and "h200-" in v.why
    # the other way round: measured faster though estimated slower
    for p in results.iterdir():
        p.unlink()
    _estimate(results, "2026-12-01", {("A1", "fwd", "cuda"): 90.0, ("A1", "fwd", "triton"): 60.0})
    _measurement(results, "h100-2026-11-20.json", "9.0",
                 {("A1", "fwd+bwd", "cuda"): 200.0, ("A1", "fwd+bwd", "triton"): 250.0,
                  ("A1", "fwd", "cuda"): 50.0, ("A1", "fwd", "triton"): 60.0})  # fmt: skip
    evidence.clear_cache()
    assert evidence.verdict("relpos_attention", "cuda", "triton", (9, 0), "fwd").take
    assert evidence.verdict("relpos_attention", "cuda", "triton", (9, 0), "fwd+bwd").take
    # an sm_80 GPU has neither a measurement nor an estimate here
    v = evidence.verdict("relpos_attention", "cuda", "triton", (8, 0), "fwd")
    assert not v.take and "on sm_80" in v.why
    # a measurement on sm_80 speaks for sm_80 only
    _measurement(results, "a100-2026-11-25.json", "8.0", {("A1", "fwd", "cuda"): 10.0, ("A1", "fwd", "triton"): 20.0})
    evidence.clear_cache()
    assert evidence.verdict("relpos_attention", "cuda", "triton", (8, 0), "fwd").take
    assert evidence.verdict("relpos_attention", "cuda", "triton", (9, 0), "fwd").take  # still the h100 file


@pytest.mark.parametrize("broken", ["missing", "not json", "no sources"])
def test_without_the_packages_table_triton_comes_first_and_says_why(tmp_path, monkeypatch, broken):
    """The package's table is its only evidence (an installed package has no bench/):
    missing or unreadable, dispatch puts triton first and the verdict says why."""
    monkeypatch.delenv(evidence.RESULTS_ENV, raising=False)
    path = tmp_path / "speed_evidence.json"
    if broken != "missing":
        path.write_text("{not json" if broken == "not json" else json.dumps({"about": "x"}))
    monkeypatch.setattr(evidence, "TABLE", path)
    evidence.clear_cache()
    try:
        assert evidence.results_dir() is None and evidence.sources() == ()
        v = evidence.verdict("performer_attention", "cuda", "triton", (9, 0), "fwd")
        word = "cannot be read" if broken == "missing" else "is malformed"
        assert not v.take and v.why.startswith(f"no speed evidence (the package's table {path} {word} (")
        assert v.why.endswith("): triton first")
        assert evidence.origin().startswith(f"{path} (no evidence: ")
    finally:
        evidence.clear_cache()


def test_a_results_folder_that_is_not_there_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv(evidence.RESULTS_ENV, str(tmp_path / "nope"))
    evidence.clear_cache()
    try:
        v = evidence.verdict("relpos_attention", "cuda", "triton", (9, 0), "fwd")
        assert not v.take
        assert v.why == f"no speed evidence (${evidence.RESULTS_ENV} names {tmp_path / 'nope'}, which is not a folder): triton first"
    finally:
        evidence.clear_cache()


def test_the_table_answers_as_its_result_files_do(results, tmp_path, monkeypatch):
    """Written and read back, the package's table gives the verdicts (and the file
    names in them) that its result files give read directly."""
    _estimate(results, "2026-12-01", {**RELPOS_FAST, ("T1", "fwd", "cuda"): 200.0, ("T1", "fwd", "triton"): 100.0})
    _measurement(results, "a100-2026-11-25.json", "8.0", {("A1", "fwd", "cuda"): 10.0, ("A1", "fwd", "triton"): 20.0,
                                                         ("A1", "fwd", "eager"): 5.0})  # fmt: skip
    questions = [(op, cap, which) for op in ("relpos_attention", "performer_attention", "patch_embed")
                 for cap in ((9, 0), (8, 0)) for which in ("fwd", "fwd+bwd")]  # fmt: skip
    direct = [evidence.verdict(op, "cuda", "triton", cap, which) for op, cap, which in questions]
    assert [v.take for v in direct].count(True) == 2  # relpos fwd on sm_90 and sm_80
    path = tmp_path / "table" / "speed_evidence.json"
    path.parent.mkdir()
    path.write_text(evidence.render(evidence.sources()))
    monkeypatch.delenv(evidence.RESULTS_ENV)
    monkeypatch.setattr(evidence, "TABLE", path)
    evidence.clear_cache()
    from_table = [evidence.verdict(op, "cuda", "triton", cap, which) for op, cap, which in questions]
    assert [v.take for v in from_table] == [v.take for v in direct]
    where = "vitkernels/speed_evidence.json (the package's table)"
    assert [v.why.replace(where, str(results)) for v in from_table] == [v.why for v in direct]
    assert all(t.backend in ("cuda", "triton") for s in evidence.sources() for t in s.timings)


def _git(repo: Path, *args: str) -> str:
    import subprocess

    done = subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return done.stdout.strip()


def _commit(repo: Path, path: str, text: str) -> str:
    (repo / path).parent.mkdir(parents=True, exist_ok=True)
    (repo / path).write_text(text)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", path)
    return _git(repo, "rev-parse", "HEAD")


def _with_commit(path: Path, commit: str) -> None:
    data = json.loads(path.read_text())
    if data.get("kind") == "estimate":
        data["commit"] = commit
    else:
        data["machine_info"]["vitkernels"]["commit"] = commit
    path.write_text(json.dumps(data))


def test_evidence_of_newer_kernels_comes_first(tmp_path):
    """With git: a measurement of kernels changed since loses to an estimate of the new
    ones, and beats an estimate of the same kernels however the dates fall."""
    repo, folder = tmp_path / "repo", tmp_path / "results"
    repo.mkdir(), folder.mkdir()
    _git(repo, "init", "-q")
    old = _commit(repo, "csrc/kernels/relpos.cuh", "old kernel")
    new = _commit(repo, "csrc/kernels/relpos.cuh", "new kernel")
    docs = _commit(repo, "README.md", "prose only: same kernels as `new`")
    slow = {("A1", "fwd", "cuda"): 90.0, ("A1", "fwd", "triton"): 60.0}
    fast = {("A1", "fwd", "cuda"): 50.0, ("A1", "fwd", "triton"): 60.0}
    measured = _measurement(folder, "h200-2026-11-20.json", "9.0", fast)
    estimated = _estimate(folder, "2026-11-19", slow)

    def answer() -> evidence.Verdict:
        found = evidence.order(evidence.read_folder(folder), repo)
        return evidence.judge(found, str(folder), "relpos_attention", "cuda", "triton", (9, 0), "fwd", "bf16")

    _with_commit(measured, old)
    _with_commit(estimated, new)
    v = answer()
    assert not v.take and v.why.startswith("estimate 90 us vs triton 60 us")
    _with_commit(estimated, docs)  # a later commit, but the kernels `new` measured
    _with_commit(measured, new)
    v = answer()
    assert v.take and v.why.startswith("measured at least as fast")
    _with_commit(estimated, "0" * 40)  # a commit git does not know: measurements first
    _with_commit(measured, old)
    assert answer().take
    assert evidence.order([], repo) == ()


def test_unreadable_and_foreign_files_are_ignored(results):
    (results / "broken-2026-12-01.json").write_text("{not json")
    (results / "notes.json").write_text(json.dumps([1, 2]))
    _measurement(results, "nogpu-2026-12-01.json", "", {("T1", "fwd", "cuda"): 1.0, ("T1", "fwd", "triton"): 2.0})
    _estimate(results, "2026-12-01", {("T1", "fwd", "cuda"): 1.0, ("T1", "fwd", "triton"): 2.0}, arch="sm_80")
    v = evidence.verdict("performer_attention", "cuda", "triton", (9, 0), "fwd")
    assert not v.take and v.why.startswith("no measurement or estimate")


# ----------------------------------------------------------------------------
# the ops' dispatch


@pytest.fixture
def gpu(monkeypatch):
    """Fake CUDA tensors on an sm_90 device with the CUDA extension 'loaded'."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(cuda, "unavailable_reason", lambda: None)
    monkeypatch.setattr(cuda, "has_op", lambda name: True)


def _calls(requires_grad: bool = False):
    with FakeTensorMode():

        def t(*shape):
            return torch.empty(*shape, device="cuda", dtype=torch.bfloat16).requires_grad_(requires_grad)

        return [
            ("relpos_attention", relpos, (t(1, 2, 16, 16), t(1, 2, 16, 16), t(1, 2, 16, 32), t(2, 16)),
             {"fmap_size": 4}),
            ("performer_attention", performer, (t(1, 8, 16), t(1, 8, 16), t(1, 8, 16), t(4, 16)), {}),
            ("patch_embed", patch_embed, (t(1, 3, 8, 8), t(4, 12)), {"kernel_size": 2}),
        ]  # fmt: skip


def test_dispatch_takes_cuda_only_where_the_evidence_says_so(results, gpu):
    _estimate(results, "2026-12-01", {
        **RELPOS_FAST,
        ("T1", "fwd", "cuda"): 200.0, ("T1", "fwd", "triton"): 100.0,
        ("P1", "fwd", "cuda"): 90.0, ("P1", "fwd", "triton"): 90.0,  # a tie goes to cuda
        ("A1", "fwd+bwd", "cuda"): 400.0, ("A1", "fwd+bwd", "triton"): 300.0,
    })  # fmt: skip
    want = {"relpos_attention": "cuda", "performer_attention": "triton", "patch_embed": "cuda"}
    for op, module, args, kwargs in _calls():
        chosen, verdicts = module.which_backend(*args, **kwargs)
        assert chosen == want[op], verdicts
        reasons = dict(verdicts)["cuda"]
        if want[op] == "triton":
            assert reasons == [f"passed over: estimate 200 us vs triton 100 us at T1 fwd "
                               f"({results / 'estimate-sm90a-2026-12-01.json'})"]  # fmt: skip
            assert select(module.BACKENDS, module._inputs(*args, **kwargs)).name == "triton"
        else:
            assert reasons == []
        # forcing cuda needs no evidence
        assert select(module.BACKENDS, module._inputs(*args, **kwargs), "cuda").name == "cuda"
    # with gradients the fwd+bwd rows decide: relpos goes to triton
    op, module, args, kwargs = _calls(requires_grad=True)[0]
    chosen, verdicts = module.which_backend(*args, **kwargs)
    assert chosen == "triton" and dict(verdicts)["cuda"][0].startswith("passed over: estimate 400 us vs triton 300")
    with torch.no_grad():
        assert module.which_backend(*args, **kwargs)[0] == "cuda"


def test_dispatch_without_evidence_puts_triton_first(results, gpu):
    for op, module, args, kwargs in _calls():
        chosen, verdicts = module.which_backend(*args, **kwargs)
        assert chosen == "triton"
        (reason,) = dict(verdicts)["cuda"]
        assert reason.startswith("passed over: no measurement or estimate of cuda and triton for " + op)


def test_the_evidence_is_a_constant_to_torch_compile(results):
    """Dispatch runs inside compiled graphs: the lookup must not break a fullgraph trace."""
    _estimate(results, "2026-12-01", RELPOS_FAST)

    def f(x):
        why = evidence.passed_over("relpos_attention", "cuda", "triton", 9, 0, "fwd", "bfloat16")
        return x + (1.0 if why else 2.0)

    out = torch.compile(f, fullgraph=True, backend="eager")(torch.zeros(3))
    assert out.tolist() == [2.0, 2.0, 2.0]


def test_info_shows_which_and_why(results, capsys):
    from vitkernels.__main__ import info_main

    _estimate(results, "2026-12-01", {**RELPOS_FAST, ("A1", "fwd+bwd", "cuda"): 400.0,
                                      ("A1", "fwd+bwd", "triton"): 300.0})  # fmt: skip
    assert info_main([]) == 0
    out = capsys.readouterr().out
    assert f"speed evidence from {results}" in out
    lines = [ln.split(None, 1) for ln in out.splitlines() if ln.startswith("relpos_attention") and "sm_90" in ln]
    assert [ln[1].split(":")[0:2] for ln in lines] == [["sm_90 fwd", " taken"], ["sm_90 fwd+bwd", " passed over"]]
    assert "estimate 400 us vs triton 300 us at A1 fwd+bwd" in out


def test_the_packages_table_is_what_bench_results_say():
    """vitkernels/speed_evidence.json is what `python -m vitkernels.evidence` writes
    from this checkout's bench/results/ (rerun it after adding or regenerating one)."""
    checkout = evidence._CHECKOUT
    found = evidence.read_folder(evidence._CHECKOUT_RESULTS)
    assert found, f"no result files in {evidence._CHECKOUT_RESULTS}"
    unknown = [s.commit for s in found if evidence._git(checkout, "cat-file", "-e", f"{s.commit}^{{commit}}") is None]
    if unknown:
        pytest.skip(f"this checkout's git history lacks the result files' commits {unknown} (a shallow clone?)")
    want = evidence.render(evidence.order(found, checkout))
    assert evidence.TABLE.read_text() == want, "stale: run `python -m vitkernels.evidence` and commit the table"


def test_dispatch_with_the_packages_table_follows_its_verdicts(gpu, monkeypatch):
    """End to end on the shipped table (no results folder named): each op's automatic
    choice on sm_90 is cuda exactly where the table's verdict takes it, with the
    verdict as cuda's reason otherwise; forcing cuda works either way."""
    monkeypatch.delenv(evidence.RESULTS_ENV, raising=False)
    evidence.clear_cache()
    try:
        for op, module, args, kwargs in _calls():
            v = evidence.verdict(op, "cuda", "triton", (9, 0), "fwd")
            # "... (closest: 69 us vs 157 us at A3 fwd (bench/results/<file>.json))"
            assert re.search(r"\(bench/results/[\w.-]+\.json\)\)?$", v.why), v.why
            chosen, verdicts = module.which_backend(*args, **kwargs)
            assert chosen == ("cuda" if v.take else "triton"), verdicts
            assert dict(verdicts)["cuda"] == ([] if v.take else [f"passed over: {v.why}"])
            assert select(module.BACKENDS, module._inputs(*args, **kwargs), "cuda").name == "cuda"
    finally:
        evidence.clear_cache()
