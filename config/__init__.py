"""Per-environment defaults (`config/<env>.py`) and process settings (gunicorn, RQ).

Environment variables always win over these files.
"""
