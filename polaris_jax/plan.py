"""`python -m polaris_jax.plan ...`: the memory planner's command, kept at its published name (see tools/plan.py)."""

from absl import app

from polaris_jax.tools.plan import main

if __name__ == "__main__":
    app.run(main)
