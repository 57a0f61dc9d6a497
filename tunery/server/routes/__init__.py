"""The console's routes, one module per page: jobs (runs and jobs, one job), new (a fine-tune), runs (one run:
eval, chat, export), compare."""
