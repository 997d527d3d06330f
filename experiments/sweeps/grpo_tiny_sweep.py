"""Learning rate x group size x clip_high over the tiny GRPO demo (configs/grpo_tiny.py), 8 points.

    python experiments/sweep.py --sweep=experiments/sweeps/grpo_tiny_sweep.py --root=runs/grpo_sweep --parallel=2
    python experiments/sweep.py --sweep=experiments/sweeps/grpo_tiny_sweep.py:smoke --root=/tmp/grpo_smoke
    python experiments/sweep.py --sweep=experiments/sweeps/grpo_tiny_sweep.py --root=runs/grpo_sweep --launcher=xm

Each point is one full demo run (SFT warm start, GRPO, held-out evaluation before and after); the
summary table lists held-out pass@1 before and after GRPO with the final training reward. The
`smoke` variant shortens every run (20 SFT steps, 2 + 2 GRPO steps, 16 held-out problems) to check
the plumbing; its accuracies mean nothing. On the 2-core CPU box of this repository (shared with other
jobs) the 8 smoke points took 20 minutes with --parallel=2, 5-10 minutes each.
Group size is `rollout.samples_per_prompt` (G in the GRPO paper); clip_high is DAPO's upper clip.
"""


def get_sweep(arg: str = ""):
    if arg not in ("", "smoke"):
        raise ValueError(f"unknown grpo_tiny_sweep variant {arg!r}; use '' or 'smoke'")
    base = {}
    if arg == "smoke":  # minutes in total, not the demo's numbers
        base = {
            "demo.sft_steps": 20,
            "demo.sft_examples": 2000,
            "demo.eval_problems": 16,
            "schedule.steps": (2, 2),
            "rollout.prompts_per_step": 4,
            "checkpoint.every": 1000,
            "plots": False,
        }
    return dict(
        name="grpo_tiny_lr_group_clip" + (f"_{arg}" if arg else ""),
        config="configs/grpo_tiny.py",
        base=base,
        grid={
            "optimizer.peak_lr": [1e-4, 3e-4],
            "rollout.samples_per_prompt": [4, 8],
            "algo.clip_high": [0.2, 0.28],
        },
        metrics=("accuracy_before", "accuracy_after", "improvement", "grpo_final_reward_mean", "total_s"),
    )
