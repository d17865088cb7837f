# One image for the CLI and the workers. CUDA comes with the torch wheel from PyPI; the host needs
# the NVIDIA driver and the container toolkit for GPU workers.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY adqueue adqueue
COPY workers workers
COPY migrations migrations
RUN pip install --no-cache-dir .
ENV ADQUEUE_DATA_DIR=/data \
    MALLOC_MMAP_THRESHOLD_=4294967296 \
    MALLOC_TRIM_THRESHOLD_=4294967296
VOLUME ["/data"]
ENTRYPOINT ["adqueue"]
CMD ["--help"]
