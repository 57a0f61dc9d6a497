"""The web console (`tunery ui`): FastAPI pages over the same modules the CLI uses. See app.py."""
