"""Device profiles: what a board offers a model (flash, SRAM, clock, MACs per cycle).

A profile is a YAML file with exactly the keys of :class:`DeviceProfile`
(``notes`` optional). Sizes are bytes, as an integer or as text with a binary
unit (``512 KiB``, ``2 MiB``, ``16 GiB``). The built-in profiles live next to
this module, one per file, named after the core (``cortex-m7.yaml``); each
names the board whose numbers it carries. A user's own board is a path to a
YAML file of the same form.

Fit checks against a profile are exact (bytes). Latency from a profile is an
*estimate*: ``MACs / (MACs per cycle x clock)``, ignoring memory stalls and
every non-MAC op; the MACs-per-cycle figures are typical sustained rates of
the cores' optimized int8/fp32 kernels, not measurements of this model.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from edgeopt.errors import ConfigError

__all__ = ["DeviceProfile", "known_devices", "load_device", "parse_bytes"]

_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}
#: The largest memory a profile may give (the generated C compares the arena with it as a constant).
_MAX_BYTES = 2**40


@dataclass(frozen=True, kw_only=True)
class DeviceProfile:
    """One board: memory in bytes, clock in MHz, sustained MACs per cycle of int8 and fp32 kernels."""

    name: str
    board: str
    flash_bytes: int
    sram_bytes: int
    clock_mhz: float
    int8_macs_per_cycle: float
    fp32_macs_per_cycle: float
    notes: str = ""

    def __post_init__(self) -> None:
        for key in ("flash_bytes", "sram_bytes"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _MAX_BYTES:
                raise ConfigError(f"device {self.name!r}: {key} must be a positive number of bytes up to 1 TiB, "
                                  f"got {value!r}")
        for key in ("clock_mhz", "int8_macs_per_cycle", "fp32_macs_per_cycle"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ConfigError(f"device {self.name!r}: {key} must be a positive finite number, got {value!r}")

    def estimated_latency_ms(self, macs: int, *, dtype: str = "int8") -> float:
        """``macs / (macs per cycle x clock)`` in ms: an estimate (no memory stalls, no non-MAC ops)."""
        per_cycle = self.int8_macs_per_cycle if dtype == "int8" else self.fp32_macs_per_cycle
        return macs / (per_cycle * self.clock_mhz * 1e6) * 1e3

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_KEYS = tuple(f.name for f in dataclasses.fields(DeviceProfile) if f.name != "name")


def parse_bytes(value: object, *, what: str) -> int:
    """``524288``, ``"512 KiB"``, ``"2MiB"`` -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?(?:e[0-9]+)?)\s*([KMG]i?B|B)?\s*", str(value), flags=re.I)
    if match is None:
        raise ConfigError(f"{what}: {value!r} is not a size; write bytes (524288) or with a unit (512 KiB, 2 MiB)")
    number, unit = match.groups()
    size = float(number) * _UNITS[(unit or "").lower()]
    if not size.is_integer():  # 20000.7 bytes was cut to 20000
        raise ConfigError(f"{what}: {value!r} is not a whole number of bytes")
    return int(size)


def _folder():
    return resources.files("edgeopt.devices")


def known_devices() -> tuple[str, ...]:
    """Names of the built-in profiles."""
    return tuple(sorted(entry.name[:-5] for entry in _folder().iterdir() if entry.name.endswith(".yaml")))


def _from_mapping(name: str, data: object, source: str) -> DeviceProfile:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a device profile is a mapping of {', '.join(_KEYS)}")
    unknown = sorted(set(data) - set(_KEYS))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(map(str, unknown))}; allowed: {', '.join(_KEYS)}")
    missing = [key for key in _KEYS if key not in data and key != "notes"]
    if missing:
        raise ConfigError(f"{source}: missing key(s) {', '.join(missing)}")
    values = dict(data)
    for key in ("flash_bytes", "sram_bytes"):
        values[key] = parse_bytes(values[key], what=f"{source}: {key}")
    return DeviceProfile(name=name, **values)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader refusing a key given twice (the later silently won: an sram_bytes edited below the
    old one left both, and which counted depended on their order)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice (again on line "
                                                        f"{key_node.start_mark.line + 1})",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(text: str, source: str) -> object:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as error:
        lines = str(error).splitlines()
        problem = next((line for line in lines if "given twice" in line), lines[0])
        raise ConfigError(f"{source} is not valid YAML: {problem.strip()}") from None


def load_device(device: str | Path | DeviceProfile) -> DeviceProfile:
    """A built-in profile by name (``cortex-m7``), or a profile YAML file by path."""
    if isinstance(device, DeviceProfile):
        return device
    text = str(device)
    if text.endswith((".yaml", ".yml")) or Path(text).is_file():
        path = Path(text)
        if not path.is_file():
            raise ConfigError(f"device profile {path} not found")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise ConfigError(f"device profile {path} is not UTF-8 text (byte {error.start}): save it as UTF-8 "
                              "YAML") from None
        return _from_mapping(path.stem, _read_yaml(text, str(path)), str(path))
    if text not in known_devices():
        raise ConfigError(f"unknown device {text!r}: known devices are {', '.join(known_devices())}, "
                          "or give the path of a profile YAML file")
    resource = _folder() / f"{text}.yaml"
    return _from_mapping(text, _read_yaml(resource.read_text(), f"{text}.yaml"), f"{text}.yaml")
