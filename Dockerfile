# One image definition, one target per service (docker-compose.yml picks them with build.target).
#   gateway       tokenizer + FastAPI/uvicorn, no torch
#   scheduler     grpc + the pure scheduling core, no torch
#   executor-cpu  + torch (CPU wheel, forced by constraints-cpu.txt) + transformers (+ gguf for the
#                 one-time SmolLM2 conversion) + g++ for the executor's C++ kernels
#   executor-gpu  + torch with CUDA from the base image
# Every target's entrypoint is the `slai-serve` command; compose passes the subcommand and flags.
ARG PYTHON_IMAGE=python:3.11-slim
ARG CUDA_IMAGE=pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 SLAI_MODEL_CACHE=/models/smollm2-135m-instruct
WORKDIR /app
COPY pyproject.toml README.md constraints-cpu.txt ./
COPY contract ./contract
COPY scheduler_svc ./scheduler_svc
COPY executor_svc ./executor_svc
COPY gateway ./gateway
COPY wire ./wire
COPY telemetry ./telemetry
COPY slai_serve ./slai_serve
COPY protos ./protos
ENTRYPOINT ["slai-serve"]

FROM base AS scheduler
RUN pip install .
EXPOSE 50061 9101

FROM base AS gateway
RUN pip install ".[gateway]"
EXPOSE 50051 8000

FROM base AS executor-cpu
# g++: the executor compiles its C++ kernels for the CPU it starts on (~1 s; docs/executor.md, "C++ kernels")
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
RUN pip install -c constraints-cpu.txt --extra-index-url https://download.pytorch.org/whl/cpu ".[executor,tools]"
EXPOSE 50071 9102

FROM ${CUDA_IMAGE} AS executor-gpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 SLAI_MODEL_CACHE=/models/smollm2-135m-instruct
WORKDIR /app
COPY --from=base /app /app
# torch comes with the base image; flash-attn ([gpu]) is optional and built separately when wanted
RUN pip install ".[executor,tools]"
EXPOSE 50071 9102
ENTRYPOINT ["slai-serve"]
