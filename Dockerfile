# One image for every sample service; compose.yaml picks the service per container.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY framework ./framework
COPY services ./services
RUN pip install --no-cache-dir ".[web]"
ENV LOG_FORMAT=json
USER nobody
