"""constraints.txt is the tested set: setup.py's exact pins agree with it, and the environment the suite runs in
(scripts/_venv.sh installs with `-c constraints.txt`) holds exactly those versions."""
import importlib.metadata
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s;#]+)")


def _pins(lines) -> dict:
    pins = {}
    for line in lines:
        m = PIN.match(line.strip())
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def _constraints() -> dict:
    return _pins((ROOT / "constraints.txt").read_text().splitlines())


def test_setup_pins_agree_with_constraints():
    setup_pins = _pins(re.findall(r'"([^"]+==[^"]+)"', (ROOT / "setup.py").read_text()))
    constraints = _constraints()
    assert setup_pins, "setup.py pins nothing exactly"
    for name, version in setup_pins.items():
        assert constraints.get(name) == version, f"setup.py pins {name}=={version}, constraints.txt {constraints.get(name)}"


@pytest.mark.parametrize("name", ["jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "seqio", "tensorflow"])
def test_environment_holds_the_tested_versions(name):
    pinned = _constraints()[name]
    installed = importlib.metadata.version(name).split("+")[0]
    assert installed == pinned, f"{name} {installed} installed, constraints.txt tests {pinned}: bash scripts/_venv.sh"
