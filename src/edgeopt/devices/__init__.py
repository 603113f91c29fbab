"""Device profiles (YAML, one per board) and their typed loader; see :mod:`edgeopt.devices.profile`."""

from edgeopt.devices.profile import DeviceProfile, known_devices, load_device, parse_bytes

__all__ = ["DeviceProfile", "known_devices", "load_device", "parse_bytes"]
