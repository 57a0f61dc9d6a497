"""The advisor: what a fine-tune will need before it starts (memory.py: peak GPU memory; speed.py: step time on
a flavor's GPU; shape.py: the numbers both read off a model's config) and what to run (plan.py: `tunery plan`;
leaderboard.py: `tunery compare`)."""
