"""The `memplan` command end to end: compile + check round trips, tampered plans,
and bad input that must end in one line and exit code 2."""

import json
import subprocess
import sys

import pytest
import torch

from planner.cli import main
from planner.plan import Instr, Plan

SMALL_RESNET = "zoo:resnet50:res=32"


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        a = torch.relu(self.bn(self.conv1(x)))
        b = torch.relu(self.conv2(a) + a)
        return self.fc(b.mean((2, 3)))


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    torch.manual_seed(0)
    torch.onnx.export(TinyNet().eval(), (torch.randn(1, 3, 16, 16),), str(path), dynamo=False, opset_version=17,
                      input_names=["input0"])
    return str(path)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def report(out: str) -> dict:
    return json.loads(out)


@pytest.mark.parametrize("model", ["onnx", SMALL_RESNET])
def test_compile_then_check_round_trip(tmp_path, capsys, tiny_onnx, model):
    model = tiny_onnx if model == "onnx" else model
    plan_path = str(tmp_path / "p.json")
    code, out, _ = run(capsys, "inspect", model, "--json")
    assert code == 0
    info = report(out)
    cap = (info["M_R"] + info["max_live"]) // 2 // 64 * 64 + 64
    code, out, _ = run(capsys, "compile", model, "--capacity", str(cap), "--planner", "baseline", "-o", plan_path,
                       "--json")
    assert code == 0
    compiled = report(out)
    assert compiled["arena_bytes"] <= cap
    code, out, _ = run(capsys, "check", plan_path, model, "--json")
    assert code == 0
    checked = report(out)
    assert checked["valid"] is True
    for key in ("peak_bytes", "arena_bytes", "load_bytes", "store_bytes", "noncompulsory_bytes", "recompute_flops"):
        assert checked[key] == compiled[key]


def tamper(plan: Plan, how: str) -> Plan:
    ins = list(plan.instructions)
    if how == "drop":
        first_compute = next(i for i, x in enumerate(ins) if x.kind == "compute")
        del ins[first_compute]
    else:  # move the second buffer's offset onto a neighbour that is live at the same time
        b = plan.buffers
        pair = next((x, y) for x in b for y in b if x is not y and x.start < y.start < x.end and x.size > 0 < y.size)
        step = pair[1].start
        target = ins[step]
        new = tuple(pair[0].offset if o == pair[1].offset else o for o in target.offsets)
        ins[step] = Instr(target.kind, target.ref, new)
    return plan.with_(instructions=tuple(ins))


@pytest.mark.parametrize("how", ["drop", "overlap"])
def test_tampered_plans_are_rejected_with_the_step(tmp_path, capsys, tiny_onnx, how):
    plan_path = str(tmp_path / "p.json")
    assert run(capsys, "compile", tiny_onnx, "--capacity", "none", "--planner", "baseline", "-o", plan_path)[0] == 0
    bad = tamper(Plan.load(plan_path), how)
    bad.save(plan_path)
    code, out, _ = run(capsys, "check", plan_path, tiny_onnx)
    assert code == 1
    assert out.startswith("INVALID: step ")
    assert ("overlaps" in out) if how == "overlap" else ("reads" in out or "never" in out)


def test_plan_for_another_graph_is_rejected(tmp_path, capsys, tiny_onnx):
    plan_path = str(tmp_path / "p.json")
    assert run(capsys, "compile", tiny_onnx, "--capacity", "none", "--planner", "baseline", "-o", plan_path)[0] == 0
    code, out, _ = run(capsys, "check", plan_path, SMALL_RESNET)
    assert code == 1 and "plan is for graph" in out


def test_bad_input_exits_2_with_one_line(tmp_path, capsys, tiny_onnx):
    code, _, err = run(capsys, "inspect", str(tmp_path / "missing.onnx"))
    assert code == 2 and "missing.onnx" in err and len(err.strip().splitlines()) == 1
    junk = tmp_path / "junk.onnx"
    junk.write_text("not a model")
    code, _, err = run(capsys, "inspect", str(junk))
    assert code == 2 and "junk.onnx" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "compile", tiny_onnx, "--capacity", "1KiB")
    assert code == 2 and "below M_R" in err and "--capacity" in err
    code, _, err = run(capsys, "compile", tiny_onnx, "--capacity", "12 parsecs")
    assert code == 2 and "cannot read size" in err
    code, _, err = run(capsys, "inspect", "zoo:no_such_model")
    assert code == 2 and "unknown model" in err


def test_unresolved_symbolic_dim(tmp_path, capsys):
    path = str(tmp_path / "dyn.onnx")
    torch.onnx.export(TinyNet().eval(), (torch.randn(1, 3, 16, 16),), path, dynamo=False, opset_version=17,
                      input_names=["input0"], dynamic_axes={"input0": {0: "batch"}})
    code, _, err = run(capsys, "inspect", path)
    assert code == 2 and "input0" in err and "--input-shape" in err
    code, out, _ = run(capsys, "inspect", path, "--input-shape", "input0:2,3,16,16", "--json")
    assert code == 0 and report(out)["input_bytes"] == 2 * 3 * 16 * 16 * 4


def test_console_script_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "planner.cli", "check", str(tmp_path / "none.json"), "zoo:resnet50"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "none.json" in r.stderr
