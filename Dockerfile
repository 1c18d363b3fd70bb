# specdraft retriever image (CPU, no torch): the retriever and the index builder. The C++ core
# is compiled in a build stage; the runtime stage holds only the installed wheels (no compiler).
# The verifier has its own image: Dockerfile.verifier. EXTRAS adds optional extras (e.g. faiss).
#   docker build -t specdraft .
#   docker build --build-arg EXTRAS=faiss -t specdraft .
#   docker run -p 50051:50051 -v ./data:/data:ro specdraft \
#       specdraft retriever serve --port 50051 --index /data/indexes/stdlib

FROM python:3.11-slim AS build
ARG EXTRAS=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# scikit-build-core brings cmake and ninja from PyPI when the image has none.
COPY pyproject.toml CMakeLists.txt README.md ./
COPY specdraft specdraft
COPY retriever retriever
COPY verifier verifier
COPY index_builder index_builder
COPY protos protos
RUN pip wheel --wheel-dir /wheels ".${EXTRAS:+[$EXTRAS]}"

FROM python:3.11-slim
ARG EXTRAS=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
COPY --from=build /wheels /wheels
RUN pip install --no-index --find-links /wheels "specdraft${EXTRAS:+[$EXTRAS]}" && rm -rf /wheels \
    && useradd --create-home --uid 10001 specdraft
USER specdraft
WORKDIR /home/specdraft
EXPOSE 50051
# Health: the standard grpc.health.v1 service (NOT_SERVING until the indexes are loaded).
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 CMD python -c "import grpc, sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; r = g.HealthStub(grpc.insecure_channel('localhost:50051')).Check(h.HealthCheckRequest(service=''), timeout=3); sys.exit(r.status != h.HealthCheckResponse.SERVING)"
CMD ["specdraft", "retriever", "serve", "--port", "50051"]
