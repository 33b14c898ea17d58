"""Static checks shared by the deployment tests: Dockerfile COPY sources against the build
context and .dockerignore, and BINLOOP_* environments against each service's settings."""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

from pydantic import ValidationError

from services.registry import SERVICES

ROOT = Path(__file__).resolve().parent.parent
ENV_PREFIX = "BINLOOP_"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str
    line: int


def dockerfile_instructions(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    instructions: list[Instruction] = []
    pending = ""
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        pending += line
        keyword, _, arguments = pending.partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip(), start))
        pending = ""
    return instructions


def copy_sources(instruction: Instruction) -> list[str]:
    """Sources of a COPY/ADD from the build context; [] for COPY --from=<stage>."""
    words = shlex.split(instruction.arguments)
    if any(word.startswith("--from=") for word in words):
        return []
    paths = [word for word in words if not word.startswith("--")]
    return paths[:-1]


@dataclass(frozen=True)
class DockerIgnore:
    """The .dockerignore rules: the last matching pattern wins, '!' re-includes."""

    patterns: tuple[tuple[str, bool], ...]

    @classmethod
    def load(cls, path: Path) -> DockerIgnore:
        rules: list[tuple[str, bool]] = []
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            include = line.startswith("!")
            rules.append((os.path.normpath(line.lstrip("!")), include))
        return cls(tuple(rules))

    def excludes(self, relative: str) -> bool:
        relative = os.path.normpath(relative)
        excluded = False
        for pattern, include in self.patterns:
            if _matches(pattern, relative):
                excluded = not include
        return excluded


def _matches(pattern: str, relative: str) -> bool:
    # A pattern matches the path itself or any of its parent folders (a folder rule hides
    # everything under it); '**' matches any number of folders.
    parts = relative.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    if pattern.startswith("**/"):
        tail = pattern[3:]
        return any(fnmatch.fnmatchcase(part, tail) for part in parts)
    # A re-included folder also re-includes what is under it.
    return any(fnmatch.fnmatchcase(candidate, pattern) for candidate in candidates)


def files_under(path: Path) -> Iterator[Path]:
    if path.is_file():
        yield path
        return
    yield from (child for child in path.rglob("*") if child.is_file())


def settings_errors(service: str, environment: Mapping[str, str]) -> list[str]:
    """What is wrong with a service's BINLOOP_* environment: names that are no setting of that
    service (the settings ignore unknown variables, so a typo would pass silently) and values
    its settings model rejects."""
    settings_cls, _ = SERVICES[service].load()
    fields = {name.upper() for name in settings_cls.model_fields}
    binloop_env = {key: value for key, value in environment.items() if key.startswith(ENV_PREFIX)}
    errors = [
        f"{service}: {key} is not a setting"
        for key in binloop_env
        if key.removeprefix(ENV_PREFIX) not in fields
    ]
    clean = {key: value for key, value in os.environ.items() if not key.startswith(ENV_PREFIX)}
    with mock.patch.dict(os.environ, {**clean, **binloop_env}, clear=True):
        try:
            settings_cls()
        except ValidationError as exc:
            errors.extend(f"{service}: {error['loc']}: {error['msg']}" for error in exc.errors())
    return errors


_DEFAULT = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::?-(?P<default>[^}]*))?\}")


def interpolate_defaults(value: str) -> str:
    """Compose's ${VAR:-default} with VAR unset: the value a fresh checkout runs with."""
    return _DEFAULT.sub(lambda match: match.group("default") or "", value)
