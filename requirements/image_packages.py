"""Build-time guard of the image's Python packages (stdlib only: runs on any base's Python).

freeze       before anything is installed: record the base's packages and `pip check` problems
constraints  the base packages the lock does not own (torch above all) as a pip constraints file;
             fails first, naming them, if the lock would change any of them
verify       after an install: fail, naming them, if any of those base packages changed
pip-check    fail on `pip check` problems the base did not already have (NGC ships a few); a
             base without triton (a CPU stand-in) may leave liger-kernel's triton missing
manifest     write the provenance manifest: every installed version, git sha, base image
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

LOCK_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==")
# The Dockerfile's record of the base: freeze writes it, the later steps read it.
BUILD_DIR = Path("/opt/llmtrain/build")
NO_EMIT = re.compile(r"--no-emit-package[ =]([A-Za-z0-9._-]+)")


def canonical(name: str) -> str:
    """PEP 503 name: pip lists 'typing_extensions', the lock pins 'typing-extensions'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    """What pip sees installed (the same view as pip install and pip check)."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return {canonical(p["name"]): p["version"] for p in json.loads(out)}


def pip_check_problems() -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "check", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
    )
    if proc.returncode == 0:
        return []
    return sorted(line for line in proc.stdout.splitlines() if line.strip())


def lock_pins(lock: Path) -> dict[str, set[str]]:
    """name -> versions pinned (a universal lock may pin two, one per Python version)."""
    pins: dict[str, set[str]] = {}
    for line in lock.read_text().splitlines():
        match = LOCK_PIN.match(line)
        if match:
            version = line[match.end() :].split(";")[0].split()[0]
            pins.setdefault(canonical(match.group(1)), set()).add(version)
    return pins


def never_in_lock(lock: Path) -> set[str]:
    """The packages `make lock` leaves to the base (its --no-emit-package list), and torch."""
    return {canonical(n) for n in NO_EMIT.findall(lock.read_text())} | {"torch"}


def read_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[canonical(name)] = version
    return pins


def write_pins(path: Path, pins: dict[str, str], header: str = "") -> None:
    path.write_text(header + "".join(f"{n}=={v}\n" for n, v in sorted(pins.items())))


def freeze(args: argparse.Namespace) -> int:
    out: Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    base = installed()
    write_pins(out / "base-packages.txt", base)
    (out / "base-pip-check.txt").write_text("".join(f"{p}\n" for p in pip_check_problems()))
    print(f"image_packages: base has {len(base)} packages")
    return 0


def constraints(args: argparse.Namespace) -> int:
    base = read_pins(args.base_packages)
    pins = lock_pins(args.lock)
    protected = never_in_lock(args.lock)
    owned = (set(pins) - protected) | {canonical(n) for n in args.own}
    kept = {n: v for n, v in base.items() if n not in owned}
    clashes = [
        f"  {name}: base {kept[name]}, lock {' or '.join(sorted(pins[name]))}"
        for name in sorted(set(pins) & set(kept))
        if pins[name] != {kept[name]}
    ]
    if clashes:
        print(
            "image_packages: the lock would change base packages it must not own:\n"
            + "\n".join(clashes)
            + "\n  fix: regenerate the lock with `make lock` (it leaves these to the base)",
            file=sys.stderr,
        )
        return 1
    write_pins(
        args.out,
        kept,
        "# Base image packages the lock does not own: pip installs in the build run under\n"
        "# these (PIP_CONSTRAINT), and `image_packages.py verify` checks none changed.\n",
    )
    print(f"image_packages: {len(kept)} base packages kept as constraints, {len(owned)} owned")
    return 0


def verify(args: argparse.Namespace) -> int:
    now = installed()
    kept = read_pins(args.constraints)
    changed = [
        f"  {name}: base {version} -> {now.get(name, 'removed')}"
        for name, version in sorted(kept.items())
        if now.get(name) != version
    ]
    if changed:
        print(
            "image_packages: the build changed base packages the lock does not own:\n"
            + "\n".join(changed)
            + "\n  fix: keep the base's versions (requirements/constraints.in, then `make lock`)"
            " or choose a base image that has the versions the lock needs",
            file=sys.stderr,
        )
        return 1
    print(f"image_packages: all {len(kept)} base packages unchanged")
    return 0


# triton belongs to the base's torch (the lock never emits it). A base without it has no GPU
# compiler for liger-kernel to use, and llmtrain then falls back to its own loss (kernels/loss.py).
NO_TRITON = re.compile(r"^\S+ \S+ requires triton, which is not installed\.$")


def pip_check(args: argparse.Namespace) -> int:
    known = set(args.base.read_text().splitlines()) if args.base.exists() else set()
    base = read_pins(args.base_packages) if args.base_packages.exists() else {}
    new = []
    for problem in pip_check_problems():
        if problem in known:
            continue
        if "triton" not in base and NO_TRITON.match(problem):
            print(f"image_packages: pip check: {problem} (tolerated: no triton in the base)")
            continue
        new.append(problem)
    for problem in new:
        print(f"image_packages: pip check: {problem}", file=sys.stderr)
    if known:
        print(f"image_packages: pip check: {len(known)} problem(s) inherited from the base")
    print("image_packages: pip check: " + ("FAILED" if new else "ok"))
    return 1 if new else 0


def manifest(args: argparse.Namespace) -> int:
    now = installed()
    # Flat, because `llmtrain env` nests the whole file under its "image" key.
    data = {
        "llmtrain_version": now.get("llmtrain", ""),
        "stack": args.stack,
        "git_sha": args.git_sha,
        "base_image": args.base_image,
        "base_digest": args.base_digest,
        "python": ".".join(map(str, sys.version_info[:3])),
        "flash_attn_built": args.flash_attn == "1",
        "deepspeed_ops_prebuilt": args.deepspeed_ops == "1",
        "packages": dict(sorted(now.items())),
        "base_packages": read_pins(args.base_packages),
    }
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"image_packages: wrote {args.out} ({len(now)} packages)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("freeze")
    p.add_argument("--out-dir", type=Path, required=True)
    p.set_defaults(func=freeze)
    p = sub.add_parser("constraints")
    p.add_argument("--lock", type=Path, required=True)
    p.add_argument("--base-packages", type=Path, default=BUILD_DIR / "base-packages.txt")
    p.add_argument("--own", nargs="*", default=[], help="packages the Dockerfile installs itself")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=constraints)
    p = sub.add_parser("verify")
    p.add_argument("constraints", type=Path)
    p.set_defaults(func=verify)
    p = sub.add_parser("pip-check")
    p.add_argument("--base", type=Path, default=BUILD_DIR / "base-pip-check.txt")
    p.add_argument("--base-packages", type=Path, default=BUILD_DIR / "base-packages.txt")
    p.set_defaults(func=pip_check)
    p = sub.add_parser("manifest")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--base-packages", type=Path, default=BUILD_DIR / "base-packages.txt")
    p.add_argument("--base-image", required=True)
    p.add_argument("--base-digest", default="")
    p.add_argument("--git-sha", default="")
    p.add_argument("--flash-attn", choices=["0", "1"], default="0")
    p.add_argument("--deepspeed-ops", choices=["0", "1"], default="0")
    p.add_argument("--stack", choices=["pinned", "current"], default="pinned")
    p.set_defaults(func=manifest)
    args = parser.parse_args()
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
