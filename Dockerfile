# One image for the workers, beat, Flower, the migrate step and the demo's fake providers.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 KMSG_VAR_DIR=/var/lib/kmsg
WORKDIR /app
# The locked dependencies first (their own layer: rebuilt only when the lock changes), then the
# project on top of them without resolving anything again.
COPY requirements/main.lock requirements/main.lock
RUN pip install --no-cache-dir -r requirements/main.lock
COPY pyproject.toml README.md ./
COPY kmsg_worker ./kmsg_worker
COPY tasks ./tasks
COPY config ./config
RUN pip install --no-cache-dir --no-deps . && pip check \
    && useradd --system --home /var/lib/kmsg kmsg && mkdir -p /var/lib/kmsg && chown kmsg /var/lib/kmsg
USER kmsg
CMD ["celery", "-A", "config.celery", "worker", "--loglevel=INFO"]
