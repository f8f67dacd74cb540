"""A search on a full disk (its own file: the suite's two workers take whole files, and
test_search.py is the longest)."""

import os

import pytest

from test_search import SMOKE, _cli  # the smoke search's flags and subprocess runner


@pytest.mark.slow
def test_full_disk_is_one_error_line_and_leaves_no_temporary_files(small_disk):
  """The first checkpoint (step 20) does not fit: one line, no ckpt-N_temp, exit 2."""
  base, preexec = small_disk(400)          # the write probe (256 KiB) passes, a checkpoint not
  out = os.path.join(base, "run")
  p = _cli(SMOKE, out, preexec_fn=preexec)
  _, err = p.communicate(timeout=900)
  assert p.returncode == 2, err[-3000:]
  last = err.strip().splitlines()[-1]
  assert last.startswith("error: ") and "Traceback" not in err, err[-3000:]
  assert "No space left on device" in last or "File too large" in last, last
  assert "run the same command again" in last
  litter = [os.path.join(d, n) for d, dirs, files in os.walk(out) for n in dirs + files
            if "_temp" in n or ".tmp" in n or n.startswith(".write_test")]
  assert not litter, litter
