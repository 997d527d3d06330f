"""Training curves of a run as one PNG (matplotlib, no display), from its metrics.jsonl and evals.jsonl.

    python -m polaris_jax.tools.plots WORKDIR        # writes WORKDIR/curves.png
"""

from __future__ import annotations

import json
import os
import sys

# Panels: title -> metric names drawn together (those a run did not log are left out).
PANELS = (
    ("reward / accuracy", ("reward_mean", "accuracy")),
    ("held-out pass@1", ("eval/pass_at_1",)),
    ("groups", ("frac_all_correct_groups", "frac_all_wrong_groups")),
    ("response length", ("response_len_mean", "response_len_max")),
    ("entropy", ("entropy",)),
    ("clip fraction", ("clip_fraction",)),
    ("approx KL", ("approx_kl", "kl_to_ref")),
    ("seconds per step", ("time_rollout", "time_reward", "time_update")),
    ("loss", ("loss", "ce_loss")),
)


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _series(rows: list[dict], name: str) -> tuple[list[float], list[float]]:
    points = sorted((row["step"], row[name]) for row in rows if isinstance(row.get(name), (int, float)))
    return [p[0] for p in points], [p[1] for p in points]


def plot_training_curves(workdir: str, path: str | None = None) -> str | None:
    """Writes the PNG atomically and returns its path (None when the run logged nothing)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Held-out evaluations come from evals.jsonl only (metrics.jsonl repeats some of them).
    rows = [{k: v for k, v in row.items() if k != "eval/pass_at_1"}
            for row in read_jsonl(os.path.join(workdir, "metrics.jsonl"))]
    rows += [{"step": e["step"], "eval/pass_at_1": e["pass@1"]} for e in read_jsonl(os.path.join(workdir, "evals.jsonl"))]
    panels = [(title, names) for title, names in PANELS if any(_series(rows, n)[0] for n in names)]
    if not panels:
        return None
    cols = 3
    rows_n = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 2.8 * rows_n), squeeze=False)
    for ax, (title, names) in zip(axes.flat, panels):
        for name in names:
            steps, values = _series(rows, name)
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 12 else None, markersize=3, label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    path = path or os.path.join(workdir, "curves.png")
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m polaris_jax.tools.plots WORKDIR")
    print(plot_training_curves(sys.argv[1]))
