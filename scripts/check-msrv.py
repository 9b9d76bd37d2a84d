#!/usr/bin/env python3
"""Checks that the crate's declared MSRV (`rust-version`) is true.

Reads `cargo metadata` with every feature on and the committed Cargo.lock,
and fails if any package of the resolved graph (normal, build and dev
dependencies, every target platform) declares a `rust-version` above the
crate's, or if the crate's edition needs a newer Rust than it declares.
A package that declares none is held to the first Rust of its edition.

Only this toolchain is installed where CI runs, so the check reads what
the dependencies declare instead of building with the old toolchain.

    scripts/check-msrv.py [--manifest-path Cargo.toml]
"""

import argparse
import json
import subprocess
import sys

# The first Rust release of each edition.
EDITION_MSRV = {"2015": (1, 0), "2018": (1, 31), "2021": (1, 56), "2024": (1, 85)}


def version(text):
    """`1.85` or `1.85.0` as a comparable tuple (major, minor)."""
    return tuple(int(part) for part in text.split(".")[:2])


def show(v):
    return f"{v[0]}.{v[1]}"


def needed(package):
    """The Rust a package declares, else the one its edition needs."""
    if package.get("rust_version"):
        return version(package["rust_version"]), "rust-version"
    return EDITION_MSRV.get(package["edition"], (1, 0)), f"edition {package['edition']}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest-path", default="Cargo.toml")
    args = parser.parse_args()
    command = [
        "cargo", "metadata", "--format-version", "1", "--all-features",
        "--locked", "--manifest-path", args.manifest_path,
    ]
    result = subprocess.run(command, stdout=subprocess.PIPE)
    if result.returncode != 0:
        print(f"error: `{' '.join(command)}` failed", file=sys.stderr)
        return 1
    metadata = json.loads(result.stdout)
    packages = {package["id"]: package for package in metadata["packages"]}
    nodes = {node["id"]: node for node in metadata["resolve"]["nodes"]}
    failures = []
    for member in metadata["workspace_members"]:
        crate = packages[member]
        if not crate.get("rust_version"):
            failures.append(f"{crate['name']}: no rust-version declared")
            continue
        declared = version(crate["rust_version"])
        edition = EDITION_MSRV.get(crate["edition"], (1, 0))
        if edition > declared:
            failures.append(
                f"{crate['name']}: edition {crate['edition']} needs Rust {show(edition)}, "
                f"rust-version is {show(declared)}"
            )
        # Walk the graph from the crate, remembering how each package is reached.
        via = {member: None}
        queue = [member]
        while queue:
            current = queue.pop()
            for dep in nodes[current]["deps"]:
                if dep["pkg"] not in via:
                    via[dep["pkg"]] = current
                    queue.append(dep["pkg"])
        highest = ((0, 0), None)
        for package_id in via:
            if package_id == member:
                continue
            package = packages[package_id]
            need, source = needed(package)
            highest = max(highest, (need, package["name"] + " " + package["version"]))
            if need > declared:
                chain, step = [], via[package_id]
                while step is not None and step != member:
                    chain.append(packages[step]["name"])
                    step = via[step]
                path = " <- ".join([package["name"], *chain, crate["name"]])
                failures.append(
                    f"{package['name']} {package['version']} needs Rust {show(need)} "
                    f"({source}), above {crate['name']}'s rust-version {show(declared)}: {path}"
                )
        print(
            f"{crate['name']}: rust-version {show(declared)}, edition {crate['edition']}; "
            f"{len(via) - 1} packages checked, the highest need is "
            f"{show(highest[0])} ({highest[1]})"
        )
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
