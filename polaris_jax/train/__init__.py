"""Training: shared state, partitioning, optimizer, checkpoint, metrics and losses; sft/, grpo/ and the
rl/ objective library."""
