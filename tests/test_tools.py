"""Tests of the command-line tools (run as the user runs them: `python tools/...`)."""

import os
import re
import subprocess
import sys

import pytest

from nse_tf import arch as arch_lib
from nse_tf import cost

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tool(script, *args, timeout=300):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
  return subprocess.run([sys.executable, os.path.join("tools", script), *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=timeout)


def assert_one_error_line(proc, pattern, only_line=True):
  assert proc.returncode != 0, proc.stdout
  assert "Traceback" not in proc.stderr, proc.stderr
  errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
  assert len(errors) == 1, proc.stderr
  assert re.search(pattern, errors[0]), errors[0]
  if only_line:  # tools that do not import TensorFlow print nothing else
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()] == errors, proc.stderr


# ------------------------------------------------------------------------- space_size

def test_space_size_flops27():
  proc = run_tool("space_size.py")
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  assert "total architectures: 1.4e+110" in out
  assert out.count("101,584 op subsets") == 16
  assert out.count("101,583 op subsets") == 6
  assert "normal layers: 16 x 101,584; reduction/expansion layers: 6 x 101,583" in out


def test_space_size_latency19():
  proc = run_tool("space_size.py", "--space=latency19", "--max_ops=6")
  assert proc.returncode == 0, proc.stderr
  assert "space latency19 (19 ops) on macro latency, K = 6" in proc.stdout
  assert len(re.findall(r"layer +\d+ [NRE]:", proc.stdout)) == 21


def test_space_size_bad_max_ops():
  assert_one_error_line(run_tool("space_size.py", "--max_ops=0"), "max_ops")


# ------------------------------------------------------------------------ count_flops

def _mflops(stdout):
  m = re.search(r"([0-9.]+) MFLOPs", stdout)
  assert m, stdout
  return float(m[1])


def test_count_flops_released():
  proc = run_tool("count_flops.py", "--arch=NSENet-27")
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith("NSENet-27 (flops27@flops, scale 1.04) @ 224x224")
  assert _mflops(proc.stdout) == pytest.approx(326.33, abs=0.01)
  assert "4.606 Mparams" in proc.stdout
  assert proc.stderr.strip() == ""


def test_count_flops_json_compact_and_per_layer(tmp_path):
  a = arch_lib.load_released("NSENet")
  path = tmp_path / "final_arch.json"
  a.save(str(path))
  want = cost.arch_cost(a, 224).macs / 1e6
  proc = run_tool("count_flops.py", f"--arch_json={path}", "--per_layer")
  assert proc.returncode == 0, proc.stderr
  assert _mflops(proc.stdout) == pytest.approx(want, abs=0.005)
  assert len(re.findall(r"^  layer +\d+:", proc.stdout, re.M)) == 22
  proc = run_tool("count_flops.py", f"--arch={a.to_compact()}", "--input_size=65",
                  "--num_classes=10")
  assert proc.returncode == 0, proc.stderr
  assert _mflops(proc.stdout) == pytest.approx(cost.arch_cost(a, 65, 10).macs / 1e6, abs=0.005)


@pytest.mark.slow
def test_count_flops_verify():
  proc = run_tool("count_flops.py", "--arch=NSENet-27", "--input_size=64", "--num_classes=10",
                  "--verify")
  assert proc.returncode == 0, proc.stderr
  m = re.search(r"TensorFlow profiler .*: ([0-9.]+) M \(([-+0-9.]+) %\)", proc.stdout)
  assert m, proc.stdout
  assert abs(float(m[2])) < 0.5


@pytest.mark.parametrize("args,pattern", [
    (["--arch=NSENet-99"], "unknown released network 'NSENet-99'"),
    (["--arch=NSENet", "--keras_app=MobileNetV2"], "exactly one of"),
    (["--arch=NSENet", "--arch_json=x.json"], "exactly one of"),
    ([], "exactly one of"),
    (["--arch=NSENet", "--input_size=16"], "input_size"),
    (["--arch=flops27@flops*1.2.3:" + "|".join(["0"] * 22)], "1.2.3"),
    (["--arch=flops27@flops:0|1"], "22"),
    (["--arch=flops99@flops:0"], "flops99"),
])
def test_count_flops_bad_arguments(args, pattern):
  assert_one_error_line(run_tool("count_flops.py", *args), pattern)


def test_count_flops_missing_json(tmp_path):
  path = tmp_path / "missing.json"
  assert_one_error_line(run_tool("count_flops.py", f"--arch_json={path}"),
                        r"cannot read architecture file .*missing\.json")


@pytest.mark.parametrize("text,pattern", [
    ("{not json", "bad JSON"),
    ('{"space": "flops27", "layers": [["dw_k3_e1"]]}', "22"),
    ('{"space": "flops27", "version": 9, "layers": []}', "schema version"),
])
def test_count_flops_corrupt_json(tmp_path, text, pattern):
  path = tmp_path / "arch.json"
  path.write_text(text)
  assert_one_error_line(run_tool("count_flops.py", f"--arch_json={path}"), pattern)


@pytest.mark.slow
def test_count_flops_unknown_keras_app():
  proc = run_tool("count_flops.py", "--keras_app=NoSuchNet")
  # TensorFlow is imported on this path and may log to stderr; still one error line.
  assert_one_error_line(proc, "unknown --keras_app 'NoSuchNet'", only_line=False)


@pytest.mark.slow
def test_count_flops_detector():
  proc = run_tool("count_flops.py", "--detector=efficientdet_d0_mobilenetv2_coco",
                  "--input_size=128")
  assert proc.returncode == 0, proc.stderr[-3000:]
  row = [ln for ln in proc.stdout.splitlines()
         if ln.startswith("efficientdet_d0_mobilenetv2_coco")]
  assert len(row) == 1, proc.stdout
  size, backbone, bifpn, head, total = (float(v) for v in row[0].split()[1:6])
  assert size == 128 and total == pytest.approx(backbone + bifpn + head, abs=0.02)
  # Every map is 1/16 of its 512² size: the README's 512² numbers, divided by 16.
  # (P5 from MobileNetV2's 1280-channel head conv: nse_tf_detection/mobilenet_head.py)
  assert backbone == pytest.approx(1564.70 / 16, abs=0.02)
  assert bifpn == pytest.approx(179.19 / 16, abs=0.02)
  assert head == pytest.approx(457.78 / 16, abs=0.02)
  assert "NMS excluded" in proc.stdout
  proc = run_tool("count_flops.py", "--detector=no_such_experiment")
  assert_one_error_line(proc, "unknown --detector experiment 'no_such_experiment'",
                        only_line=False)
