"""How many architectures per second the cost table prices (the search samples thousands
per round): by pool indices (what the search uses) and by op names. CI never runs this.

  python benchmarks/cost_table_speed.py --archs=2000
"""

import time

from absl import app, flags

from nse_tf import cost

flags.DEFINE_integer("archs", 2000, "Random flops72 architectures (up to 5 ops per layer).")
FLAGS = flags.FLAGS


def main(_):
  table = cost.CostTable("flops72")
  archs = cost.random_architectures("flops72", FLAGS.archs, seed=11, max_ops=5)
  idx = [a.indices() for a in archs]
  start = time.process_time()
  by_index = [table.indices_cost(i) for i in idx]
  t_index = time.process_time() - start
  start = time.process_time()
  by_name = [table.arch_cost(a) for a in archs]
  t_name = time.process_time() - start
  assert max(abs(a - b) for a, b in zip(by_index, by_name)) < 1e-6
  print(f"CostTable (CPU time): {len(idx) / max(t_index, 1e-9):,.0f} archs/s by indices, "
        f"{len(archs) / max(t_name, 1e-9):,.0f} archs/s by names "
        f"({t_name / max(t_index, 1e-9):.1f}x)")


if __name__ == "__main__":
  app.run(main)
