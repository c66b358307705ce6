"""`tlkit finetune --preset best`: several candidate runs within a time budget, their
leaderboard, and their ensemble (weighted on validation) as one run. It trains
(tlkit.training) and ensembles (tlkit.evaluation), so it sits above both, below the CLI."""
