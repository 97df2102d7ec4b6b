"""Which HF stack this process runs on: the pinned one (transformers 4.37.2, the default image)
or the current one (transformers 5.x, `make image STACK=current`).

Every version gate in the package asks here, so that each difference between the stacks has one
name and can be found (and dropped with the pinned stack) by searching for its use. Pure
metadata: importing this module imports none of the libraries it describes.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import PackageNotFoundError, version

from packaging.version import Version

# The pinned stack's transformers; anything at or above FIRST_CURRENT is the current stack.
PINNED_TRANSFORMERS = "4.37.2"
FIRST_CURRENT = Version("5.0.0")
# Both stacks' images are built by the same Makefile target; the fix named in refusals.
CURRENT_IMAGE_HINT = (
    "run on the current stack: make image STACK=current (then make sif or make sqsh "
    "STACK=current; outside a container: make venv STACK=current)"
)


@cache
def installed(package: str) -> Version | None:
    """The installed release of `package` (a distribution name), None when it is absent."""
    try:
        return Version(version(package))
    except PackageNotFoundError:
        return None


def transformers_version() -> Version:
    found = installed("transformers")
    if found is None:  # a dependency of the package: absent only in a broken environment
        raise RuntimeError("transformers is not installed")
    return found


def at_least(package: str, release: str) -> bool:
    """Whether the installed `package` is `release` or newer (False when it is absent)."""
    found = installed(package)
    return found is not None and found >= Version(release)


def is_current() -> bool:
    """The current stack (transformers 5.x): the libraries' own mechanisms replace our shims."""
    return transformers_version() >= FIRST_CURRENT


def name() -> str:
    """`pinned` or `current`, as the image manifest and `llmtrain env` name the stack."""
    return "current" if is_current() else "pinned"


def describe() -> str:
    """One line naming the stack and its HF releases, e.g. for a refusal or `llmtrain env`."""
    parts = [f"{p} {installed(p)}" for p in ("transformers", "peft", "accelerate", "tokenizers")]
    return f"the {name()} stack ({', '.join(parts)})"
