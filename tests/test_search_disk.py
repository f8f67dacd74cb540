"""A search on a full disk (its own file: the suite's two workers take whole files, and
test_search.py is the longest)."""

import os

import pytest

from test_search import SMOKE  # the smoke search's flags


@pytest.mark.slow
def test_full_disk_is_one_error_line_and_leaves_no_temporary_files(small_disk, one_error_line):
  """The first checkpoint (step 20) does not fit: one line, no ckpt-N_temp, exit 2."""
  base, preexec = small_disk(400)          # the write probe (256 KiB) passes, a checkpoint not
  out = os.path.join(base, "run")
  # Grappler off: the write that fails is the point, not the compiled steps' speed.
  last = one_error_line("search", [*SMOKE, "--graph_optimization=off", f"--output_dir={out}"],
                        ("No space left on device", "File too large"), preexec_fn=preexec)
  assert "run the same command again" in last
  litter = [os.path.join(d, n) for d, dirs, files in os.walk(out) for n in dirs + files
            if "_temp" in n or ".tmp" in n or n.startswith(".write_test")]
  assert not litter, litter
