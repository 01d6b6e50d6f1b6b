"""Deployment configuration: settings from the environment, the Celery app, the beat schedule."""
