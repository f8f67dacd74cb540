"""What a run ran on (nse_tf/machine.py): the CPU's identity and the instruction sets that
decide TensorFlow's CPU kernels, so that results can be told apart by machine."""

import os

from nse_tf import machine

CPUINFO = """processor	: 0
vendor_id	: AuthenticAMD
cpu family	: 25
model		: 17
model name	: AMD EPYC 9B14
stepping	: 1
flags		: fpu sse2 avx avx2 fma bmi2 avx512f avx512dq avx512_bf16 avx512_vnni sha_ni

processor	: 1
vendor_id	: AuthenticAMD
cpu family	: 25
model		: 1
model name	: another CPU
flags		: fpu avx
"""


def test_cpu_info_reads_the_first_processor(tmp_path):
  path = tmp_path / "cpuinfo"
  path.write_text(CPUINFO)
  assert machine.cpu_info(str(path)) == {
      "cpu": "AMD EPYC 9B14", "cpu_id": "cpu family 25, model 17, stepping 1",
      # Only the kernel-deciding sets, in ISA_FLAGS' order (not the file's).
      "isa": "avx avx2 fma avx512f avx512_vnni avx512_bf16"}


def test_cpu_info_without_proc_falls_back_to_platform(tmp_path, monkeypatch):
  import platform  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(platform, "processor", lambda: "arm")
  assert machine.cpu_info(str(tmp_path / "absent")) == {"cpu": "arm", "cpu_id": "", "isa": ""}


def test_describe_one_line_and_differences(monkeypatch):
  for k in machine.KERNEL_ENV:
    monkeypatch.delenv(k, raising=False)
  d = machine.describe()
  assert set(d) == {"cpu", "cpu_id", "isa", "cores", "gpus", "tensorflow", "python", "kernels"}
  assert d["cores"] == os.cpu_count() and d["tensorflow"].startswith("2.")
  assert d == machine.describe()                  # the same machine describes itself alike
  line = machine.one_line({"cpu": "AMD EPYC", "cpu_id": "cpu family 25, model 1",
                           "isa": "avx avx2 fma", "cores": 2, "gpus": ["NVIDIA H100"],
                           "tensorflow": "2.20.0", "python": "3.11.7"})
  assert line == ("AMD EPYC (cpu family 25, model 1; avx avx2 fma), 2 cores, GPUs: NVIDIA H100, "
                  "TensorFlow 2.20.0, Python 3.11.7")
  assert machine.one_line({"cpu": "arm", "cpu_id": "", "isa": "", "cores": 8, "gpus": [],
                           "tensorflow": None, "python": "3.11.7"}) == "arm, 8 cores, Python 3.11.7"
  assert machine.differences(None, d) == []
  assert machine.differences(d, dict(d, python="3.12.0")) == []
  assert machine.differences(d, dict(d, isa="avx2", cores=4)) == ["isa", "cores"]
  # A record written before `kernels` was recorded is not compared on it.
  old = {k: v for k, v in d.items() if k != "kernels"}
  assert machine.differences(old, dict(d, kernels="ONEDNN_MAX_CPU_ISA=AVX2")) == []


def test_kernel_settings_count_as_another_machine(monkeypatch):
  """oneDNN capped at another instruction set (or off) picks other kernels on the same
  CPU, and so other rounding, as another machine would."""
  for k in machine.KERNEL_ENV:
    monkeypatch.delenv(k, raising=False)
  here = machine.describe()
  monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
  capped = machine.describe()
  assert capped["kernels"].startswith("ONEDNN_MAX_CPU_ISA=AVX2")
  assert machine.differences(here, capped) == ["kernels"]
  assert machine.one_line(capped).endswith(f"; kernels: {capped['kernels']}")
  assert machine.one_line({"cpu": "arm", "cores": 8, "python": "3.11.7",
                           "kernels": "TF_ENABLE_ONEDNN_OPTS=0, 1 thread per op"}) == (
                               "arm, 8 cores, Python 3.11.7; kernels: TF_ENABLE_ONEDNN_OPTS=0, "
                               "1 thread per op")
