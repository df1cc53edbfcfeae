# A GPU image that runs a study: `docker run --gpus all -v $PWD/data:/data -v $PWD/studies:/work/studies forde --study forde_cifar10`
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    FORDE_DATA=/data \
    WANDB_DIR=/work

WORKDIR /opt/forde
COPY pyproject.toml README.md ./
COPY src ./src
COPY sweeps ./sweeps
COPY analysis ./analysis
# the package from this checkout; its dependencies are pinned by pyproject.toml ranges
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[postgres]"

WORKDIR /work
ENTRYPOINT ["python", "/opt/forde/sweeps/launch.py"]
CMD ["--study", "forde_cifar10"]
