"""kmsg-worker: crash-safe delivery of Korean SMS and Kakao messages on Celery."""
