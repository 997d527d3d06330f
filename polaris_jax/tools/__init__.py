"""Tools on top of the library: the memory planner, HLO FLOP counts, checkpoint merging, the difficulty
filter, the temperature search, the CPU demo and the training-curve plotter. Each is a module with a
`python -m polaris_jax.tools.NAME` command or a `polaris_jax.main` job."""
