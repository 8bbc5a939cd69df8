"""The HTTP API: flask-smorest blueprints, schemas and the error handler."""
