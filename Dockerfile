# Flywheel service image: slim Python, non-root, migrations then uvicorn.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    FLYWHEEL_ENV=production
WORKDIR /srv/flywheel

RUN useradd --system --create-home --uid 10001 flywheel
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY alembic ./alembic
COPY funnels ./funnels
RUN pip install . && mkdir -p var && chown flywheel:flywheel var

USER flywheel
EXPOSE 8000
# FLYWHEEL_DATABASE_URL (postgresql+psycopg://…) and FLYWHEEL_SECRET_KEY must be set.
CMD ["sh", "-c", "flywheel migrate && exec uvicorn --factory app.main:create_app --host 0.0.0.0 --port 8000 --proxy-headers"]
