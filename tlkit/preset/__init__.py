"""`tlkit finetune --preset best`: several candidate runs within a time budget, their
leaderboard, and the greedy ensemble of the best as one run. It trains (tlkit.training) and
ensembles (tlkit.evaluation), so it sits above both, below the CLI."""
