# One image for the worker, beat, flower, the migrate step and the fake providers.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 KMSG_VAR_DIR=/var/lib/kmsg
WORKDIR /app
COPY pyproject.toml README.md ./
COPY kmsg_worker ./kmsg_worker
COPY tasks ./tasks
COPY config ./config
RUN pip install --no-cache-dir . && useradd --system --home /var/lib/kmsg kmsg && mkdir -p /var/lib/kmsg && chown kmsg /var/lib/kmsg
USER kmsg
CMD ["celery", "-A", "config.celery", "worker", "--loglevel=INFO"]
