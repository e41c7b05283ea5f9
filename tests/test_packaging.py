"""What a fresh machine or an image installs is what CI tested: the lower bounds, the
constraints file, and the image's contents (docker/ cannot run here; it is checked by
reading)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_every_dependency_is_pinned_within_its_bounds():
    pins = _pins()
    project = PYPROJECT["project"]
    requirements = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    problems = []
    for text in requirements:
        requirement = Requirement(text)
        pinned = pins.get(canonicalize_name(requirement.name))
        if pinned is None:
            problems.append(f"{requirement.name}: not in constraints.txt")
        elif not requirement.specifier.contains(pinned, prereleases=True):
            problems.append(f"{requirement.name}: pinned {pinned} outside {requirement.specifier}")
    assert problems == []


def test_setup_and_image_install_with_the_constraints():
    assert "-c constraints.txt" in (ROOT / "setup.sh").read_text()
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"^RUN pip install .*-c constraints\.txt", dockerfile, re.M)
    assert re.search(r"^COPY .*constraints\.txt", dockerfile, re.M)


def test_the_image_copies_every_package_the_project_installs():
    includes = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {pattern.rstrip("*") for pattern in includes}
    copied = set(re.findall(r"^COPY (\w+) \./\1$", (ROOT / "docker/Dockerfile").read_text(), re.M))
    assert packages == copied, f"missing from the image: {sorted(packages - copied)}"


def test_the_compose_commands_are_commands_of_the_cli():
    from ainode.cli import _setup_argparser

    parser = _setup_argparser()
    compose = (ROOT / "docker" / "compose.yaml").read_text()
    commands = re.findall(r'command: \["ainode", ([^\]]*)\]', compose)
    assert len(commands) >= 3  # node, web, worker
    for command in commands:
        argv = [part.strip().strip('"') for part in command.split(",")]
        parser.parse_args(argv)  # exits (SystemExit) on an unknown command or option


def test_every_node_process_in_compose_is_restarted_when_it_dies():
    compose = (ROOT / "docker" / "compose.yaml").read_text()
    services = re.split(r"^  (?=\w)", compose, flags=re.M)[1:]
    node_services = [s for s in services if 'command: ["ainode"' in s]
    assert len(node_services) >= 3
    for service in node_services:
        assert re.search(r"^    restart: (unless-stopped|always)$", service, re.M), service
