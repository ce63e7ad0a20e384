"""kaiwo-gpu's benchmarks (not tests): `python -m bench NAME` from the repository root.

`suites` names each suite and its module, `lib` holds what they share. Every figure is
printed with a ratio against a baseline measured in the same run, because shared machines
are noisy.
"""
