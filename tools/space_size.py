"""Size of an NSE search space (SPEC §2.4).

  python tools/space_size.py --space=flops27 --max_ops=5
  -> per-layer subset counts and the total, 1.4e+110 for flops27 with K = 5.
"""

from absl import flags

from nse_tf import cli
from nse_tf import spaces


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """The tool's flags (defined by cli.run, not at import)."""
  flags.DEFINE_enum("space", "flops27", sorted(spaces.POOLS), "Op pool.", flag_values=fv)
  flags.DEFINE_enum("macro", None, sorted(spaces.MACROS),
                    "Macro-architecture (default: the pool's own: flops or latency).",
                    flag_values=fv)
  flags.DEFINE_integer("max_ops", 5, "K: the most ops a layer may hold.", flag_values=fv)


FLAGS = flags.FLAGS


def main(_):
  if FLAGS.max_ops < 1:
    raise cli.UsageError(f"--max_ops must be >= 1, got {FLAGS.max_ops}")
  macro = FLAGS.macro or spaces.DEFAULT_MACRO[FLAGS.space]
  per_layer, total = spaces.space_size(FLAGS.space, FLAGS.max_ops, macro)
  n = len(spaces.get_pool(FLAGS.space))
  print(f"space {FLAGS.space} ({n} ops) on macro {macro}, K = {FLAGS.max_ops}")
  for i, (kind, count) in enumerate(zip(spaces.layer_kinds(macro), per_layer)):
    print(f"  layer {i:2d} {kind}: {count:,} op subsets")
  kinds = spaces.layer_kinds(macro)
  print(f"normal layers: {kinds.count('N')} x {spaces.layer_choices(n, FLAGS.max_ops, 'N'):,}; "
        f"reduction/expansion layers: {len(kinds) - kinds.count('N')} x "
        f"{spaces.layer_choices(n, FLAGS.max_ops, 'R'):,}")
  print(f"total architectures: {spaces.format_sci(total)}")


if __name__ == "__main__":
  cli.run(main, define_flags)
