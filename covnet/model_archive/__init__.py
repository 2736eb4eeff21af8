"""Trained models as one checked zip: export from a workspace, install into the user's cache."""
