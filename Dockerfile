# llmtrain image: NGC PyTorch base -> flash-attn -> locked deps -> llmtrain -> build-time checks.
# Build with `make image` (docs/image.md). The base's torch is never touched: every other package
# comes from requirements/lock.txt, installed under constraints frozen from the base.
# STACK=current (make image STACK=current) passes a current NGC base, LOCK=requirements/
# lock-current.txt and a newer FLASH_ATTN_VERSION: one Dockerfile for both stacks.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:24.04-py3
FROM ${BASE_IMAGE}

# Apptainer mounts $HOME: packages in ~/.local must not shadow the image's. This is the only
# ENV the image sets; tunables (HF_HOME, NCCL_*, MASTER_*) would beat the host's under Pyxis
# and Apptainer, so launchers default them at run time instead.
ENV PYTHONNOUSERSITE=1

# 0. launch.sh finds the interface that routes to the head node with `ip`; not every base
#    ships iproute2.
RUN command -v ip >/dev/null || { apt-get update \
    && apt-get install -y --no-install-recommends iproute2 && rm -rf /var/lib/apt/lists/*; }

# 1. Record the base as it came: its packages and its own `pip check` problems.
COPY requirements/image_packages.py /opt/llmtrain/build/image_packages.py
RUN python /opt/llmtrain/build/image_packages.py freeze --out-dir /opt/llmtrain/build

# 2. flash-attn, early so that lock changes do not rebuild it: from source against the base's
#    torch (prebuilt wheels break on NGC's pre-release torch), MAX_JOBS bounded because nvcc
#    runs out of memory otherwise. BUILD_FLASH_ATTN=0 for bases without CUDA. --no-deps keeps
#    torch; einops (its one runtime dependency) is added only if the base lacks it.
ARG BUILD_FLASH_ATTN=1
ARG FLASH_ATTN_VERSION=2.5.8
ARG EINOPS_VERSION=0.8.0
ARG MAX_JOBS=4
RUN if [ "$BUILD_FLASH_ATTN" = 1 ]; then \
        python -c "import einops" 2>/dev/null \
        || python -m pip install --no-cache-dir --no-deps "einops==$EINOPS_VERSION" \
        && FLASH_ATTENTION_FORCE_BUILD=TRUE MAX_JOBS="$MAX_JOBS" \
           python -m pip install --no-cache-dir --no-deps --no-build-isolation \
               --no-binary flash-attn "flash-attn==$FLASH_ATTN_VERSION" \
        && python -c "import flash_attn; print('flash_attn', flash_attn.__version__)"; \
    else echo "flash-attn: skipped (BUILD_FLASH_ATTN=$BUILD_FLASH_ATTN)"; fi

# 3. The lock. Every base package the lock does not own becomes a constraint, so pip refuses to
#    change torch and names the package; verify re-checks after each install. deepspeed is an
#    sdist: built without isolation (isolation would pull a CUDA torch from PyPI), its fused
#    ops JIT-compiled at run time unless DS_BUILD_OPS=1 prebuilds them here.
ARG DS_BUILD_OPS=0
ARG LOCK=requirements/lock.txt
COPY ${LOCK} /opt/llmtrain/requirements/lock.txt
RUN cd /opt/llmtrain \
    && python build/image_packages.py constraints --lock requirements/lock.txt \
        --own flash-attn einops --out build/base-constraints.txt \
    && DS_BUILD_OPS="$DS_BUILD_OPS" DS_BUILD_SPARSE_ATTN=0 DS_BUILD_EVOFORMER_ATTN=0 \
       DS_BUILD_CUTLASS_OPS=0 DS_BUILD_RAGGED_DEVICE_OPS=0 \
       PIP_CONSTRAINT=build/base-constraints.txt \
       python -m pip install --no-cache-dir --no-deps --require-hashes --no-build-isolation \
           -r requirements/lock.txt \
    && python build/image_packages.py verify build/base-constraints.txt

# 4. The llmtrain package (not editable: the image must not depend on a source tree).
COPY pyproject.toml README.md* /tmp/llmtrain-src/
COPY src /tmp/llmtrain-src/src
RUN PIP_CONSTRAINT=/opt/llmtrain/build/base-constraints.txt \
        python -m pip install --no-cache-dir --no-deps --no-build-isolation /tmp/llmtrain-src \
    && rm -rf /tmp/llmtrain-src \
    && python /opt/llmtrain/build/image_packages.py verify /opt/llmtrain/build/base-constraints.txt

# 5. Container-side scripts and run configs.
COPY entrypoint /opt/llmtrain/entrypoint
COPY configs /opt/llmtrain/configs
# configs/deepspeed/*.json are relative links to the package's own copies: keep them resolving.
COPY src/llmtrain/deepspeed /opt/llmtrain/src/llmtrain/deepspeed

# 6. Provenance, last so that a new commit only rebuilds these small layers. No build date:
#    the same commit on the same base gives the same manifest.
ARG BASE_IMAGE
ARG BASE_DIGEST=""
ARG GIT_SHA=unknown
ARG LLMTRAIN_VERSION=unknown
ARG LLMTRAIN_STACK=pinned
LABEL org.opencontainers.image.title="llmtrain" \
      org.opencontainers.image.description="Container-first LLM fine-tuning for Slurm and PBS" \
      org.opencontainers.image.version="${LLMTRAIN_VERSION}" \
      org.opencontainers.image.revision="${GIT_SHA}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}" \
      org.opencontainers.image.base.digest="${BASE_DIGEST}"
RUN python /opt/llmtrain/build/image_packages.py manifest --out /opt/llmtrain/manifest.json \
        --base-packages /opt/llmtrain/build/base-packages.txt \
        --base-image "$BASE_IMAGE" --base-digest "$BASE_DIGEST" --git-sha "$GIT_SHA" \
        --flash-attn "$BUILD_FLASH_ATTN" --deepspeed-ops "$DS_BUILD_OPS" \
        --stack "$LLMTRAIN_STACK" \
    && chmod -R a+rX /opt/llmtrain

# 7. A broken image fails its build: import everything, pip check, llmtrain env.
RUN /opt/llmtrain/entrypoint/entrypoint.sh check

ENTRYPOINT ["/opt/llmtrain/entrypoint/entrypoint.sh"]
CMD []
