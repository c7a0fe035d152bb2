"""What `bughunt implementations` prints: every implementation in the registry, whether it is installed here, its
library versions, the families, dtypes, devices and toggles its runner declares, and how to install it when it is
missing. `compare --help` and the README's list read the same registry, so the three cannot disagree."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
from dataclasses import asdict, dataclass

from bughunt.implementations import REGISTRY, available, runner_class_unchecked

@dataclass
class ImplementationInfo:
    name: str
    installed: bool
    versions: dict[str, str]  # distribution -> version, for the modules the implementation imports
    missing: list[str]  # modules that are not importable here
    families: list[str]
    refused_families: dict[str, str]  # family -> why the library refuses it on this path
    dtypes: list[str]
    devices: list[str]
    toggles: list[str]  # toggles the runner applies
    toggles_refused: dict[str, str]  # toggle -> why the runner cannot apply it
    install: str


def _versions(modules: tuple[str, ...]) -> dict[str, str]:
    dists = importlib.metadata.packages_distributions()
    out = {}
    for m in modules:
        for dist in dists.get(m, []):
            try:
                out[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                pass
    return out


def describe(name: str) -> ImplementationInfo:
    modules = REGISTRY[name][1]
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    try:
        cls = runner_class_unchecked(name)
    except ImportError:  # a runner module that imports its library at the top cannot even be read without it
        cls = type(name, (), {"families": (), "dtypes": (), "devices": ()})
    support = getattr(cls, "toggle_support", {})
    return ImplementationInfo(
        name=name, installed=available(name), versions=_versions(modules), missing=missing,
        families=list(cls.families), refused_families=dict(getattr(cls, "refusals", {})),
        dtypes=list(cls.dtypes), devices=list(cls.devices),
        toggles=sorted(k for k, v in support.items() if v is None),
        toggles_refused={k: v for k, v in sorted(support.items()) if v is not None},
        install=cls.install_hint or "pip install " + " ".join(missing or modules))


def describe_all() -> list[ImplementationInfo]:
    return [describe(name) for name in REGISTRY]


def format_catalog(infos: list[ImplementationInfo]) -> str:
    lines = []
    for i in infos:
        state = "installed" if i.installed else f"NOT INSTALLED (missing {', '.join(i.missing)})"
        versions = ", ".join(f"{d} {v}" for d, v in sorted(i.versions.items())) or "–"
        lines.append(f"{i.name:<12} {state:<11}  {versions}")
        lines.append(f"    families: {', '.join(i.families)}")
        for family, why in i.refused_families.items():
            lines.append(f"    refuses {family}: {why}")
        lines.append(f"    dtypes: {', '.join(i.dtypes)}   devices: {', '.join(i.devices)}")
        lines.append(f"    toggles: {', '.join(i.toggles)}"
                     + (f"   (cannot apply: {', '.join(i.toggles_refused)})" if i.toggles_refused else ""))
        if not i.installed:
            lines.append(f"    install: {i.install}")
    return "\n".join(lines)


def catalog_json(infos: list[ImplementationInfo]) -> str:
    return json.dumps([asdict(i) for i in infos], indent=2)


def impl_help() -> str:
    """The --impl help of compare: every registered implementation, from the registry."""
    return ("implementation to run (repeatable): " + ", ".join(REGISTRY) +
            "; default: hf and reference. `bughunt implementations` says which are installed here and what each runs")


def family_refusal(name: str, python: str | None, family: str) -> str | None:
    """Why an installed implementation does not run `family`, from its runner's declared families (nothing is loaded);
    None when it does, or when it runs in another interpreter (that interpreter's library decides)."""
    if python is not None or name not in REGISTRY or not available(name):
        return None
    cls = runner_class_unchecked(name)
    if family in cls.families:
        return None
    return getattr(cls, "refusals", {}).get(family) or f"{name} does not support {family} (it runs {', '.join(cls.families)})"
