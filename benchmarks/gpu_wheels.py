"""Prepare `.whl/`: the wheels `benchmarks/gpu_check.sh` installs on a lent GPU machine whose image
lacks them (nothing can be downloaded there). Run it on the development machine, from anywhere:

    python benchmarks/gpu_wheels.py            # download into <repo>/.whl, slim Ray, check the size
    python benchmarks/gpu_wheels.py --check    # only check what .whl holds

It downloads every `benchmarks/gpu_wheels.txt` pin for CPython 3.12 on manylinux x86_64 (the
device's Python; `pip download --no-deps`, so the list is the whole set), removes wheels the list
does not name (one version of each: two stop the install), rewrites Ray's wheel without the parts
no check imports (its 32 MB Java jar, RLlib, ray.llm, the dashboard's web client: the whole wheel
is 79 MB, over what a device call carries), and checks that the wheels plus the working tree fit
the 64 MiB a call carries. `.whl/` is git-ignored; the device call names it in `carry`.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PINS = Path(__file__).with_name("gpu_wheels.txt")
CARRY_LIMIT = 64 * 2**20  # a device call's working tree plus carried paths
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux_2_5_x86_64", "manylinux1_x86_64")
RAY_DROPPED = ("ray/jars/", "ray/rllib/", "ray/llm/", "ray/dashboard/client/build/")


def pins(path: Path = PINS) -> list[str]:
    """`name==version` lines of the list, comments and blanks dropped."""
    lines = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    bad = [line for line in lines if line and "==" not in line]
    if bad:
        raise ValueError(f"{path}: expected name==version lines, got {bad}")
    return [line for line in lines if line]


def wheel_key(filename: str) -> str:
    """'name==version' of a wheel file name (PEP 427: name_escaped-version-...whl), lower-case."""
    name, version = filename.split("-")[:2]
    return f"{name.lower()}=={version}"


def pin_key(pin: str) -> str:
    name, version = pin.split("==")
    return f"{name.lower().replace('-', '_').replace('.', '_')}=={version}"


def download(dest: Path, wanted: list[str]) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp", "--dest", str(dest)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run(cmd + wanted, check=True)


def slim(wheel: Path, dropped: tuple[str, ...] = RAY_DROPPED) -> tuple[int, int]:
    """Rewrite `wheel` without the files under `dropped` (and their RECORD lines); (bytes before,
    after). Entries keep their attributes, so executables stay executable when pip installs them."""
    before = wheel.stat().st_size
    tmp = wheel.with_name(wheel.name + ".slim")
    with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
        for info in zin.infolist():
            if info.filename.startswith(dropped):
                continue
            data = zin.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                kept = [ln for ln in data.decode().splitlines() if not ln.startswith(dropped)]
                data = ("\n".join(kept) + "\n").encode()
            zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    tmp.replace(wheel)
    return before, wheel.stat().st_size


def tree_bytes(root: Path = ROOT) -> int:
    """Bytes of what a device call sends besides carried paths: tracked and untracked, not ignored."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                           capture_output=True, check=True).stdout.decode().split("\0")
    return sum((root / n).stat().st_size for n in names if n and (root / n).is_file())


def check(dest: Path, wanted: list[str]) -> list[str]:
    """Problems with `dest`: pins without their wheel, wheels the list does not name, the size."""
    have = {wheel_key(w.name): w for w in dest.glob("*.whl")}
    want = {pin_key(p): p for p in wanted}
    problems = [f"missing {want[k]}" for k in sorted(set(want) - set(have))]
    problems += [f"not in {PINS.name}: {have[k].name}" for k in sorted(set(have) - set(want))]
    total = sum(w.stat().st_size for w in have.values()) + tree_bytes()
    if total > CARRY_LIMIT:
        problems.append(f"wheels + working tree = {total / 2**20:.1f} MiB > {CARRY_LIMIT / 2**20:.0f} MiB a call carries")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dest", type=Path, default=ROOT / ".whl")
    p.add_argument("--check", action="store_true", help="only check the folder")
    args = p.parse_args(argv)
    wanted = pins()
    if not args.check:
        args.dest.mkdir(exist_ok=True)
        download(args.dest, wanted)
        keys = {pin_key(w) for w in wanted}
        for stale in [w for w in args.dest.glob("*.whl") if wheel_key(w.name) not in keys]:
            stale.unlink()
        for ray in args.dest.glob("ray-*.whl"):
            with zipfile.ZipFile(ray) as z:
                if any(n.startswith(RAY_DROPPED) for n in z.namelist()):
                    before, after = slim(ray)
                    print(f"{ray.name}: {before / 2**20:.1f} -> {after / 2**20:.1f} MiB")
    problems = check(args.dest, wanted)
    size = sum(w.stat().st_size for w in args.dest.glob("*.whl")) / 2**20
    print(f"{args.dest}: {len(list(args.dest.glob('*.whl')))} wheels, {size:.1f} MiB; working tree "
          f"{tree_bytes() / 2**20:.1f} MiB")
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
