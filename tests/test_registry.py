"""One Registry for every kind of plug-in: lookup errors name the field and the closest names, the same definition
imported twice (an experiment file loaded under two module names) replaces itself, and another definition under a
taken name is refused, naming both."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest

from moejax import RouterConfig, sweep
from moejax.registry import Registry
from moejax.routing import plugin


class Thing:
    name = ""


def test_lookup_and_duplicates():
    reg: Registry[type] = Registry("widget", "model.widget")
    a = type("A", (Thing,), {"name": "alpha"})
    reg.add(a)
    assert reg.get("alpha") is a and "alpha" in reg and reg.names() == ["alpha"] and reg["alpha"] is a
    with pytest.raises(ValueError, match=r"^model\.widget='alpah': unknown widget \(did you mean 'alpha'\?\); "
                                         r"registered: \['alpha'\]$"):
        reg.get("alpah")
    reg.add(a)                                           # the same class again: nothing changes
    b = type("B", (Thing,), {"name": "alpha"})
    with pytest.raises(ValueError, match=r"^widget 'alpha' is already registered by .*\.A; .*\.B must choose"):
        reg.add(b)
    assert reg.get("alpha") is a


def test_an_experiment_file_imported_under_two_names_registers_once():
    first = sweep.load_sibling(__file__, "moejax_tests_one", "plugins/temperature_topk")
    second = sweep.load_sibling(__file__, "moejax_tests_two", "plugins/temperature_topk")
    assert first.TemperatureTopK is not second.TemperatureTopK
    assert plugin.router_kind("temperature_topk") is second.TemperatureTopK       # the later import replaced it
    assert RouterConfig(kind="temperature_topk", temperature=0.5).temperature == 0.5


def test_another_definition_under_a_taken_name_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Impostor(plugin.RouterKind):
        name: ClassVar[str] = "topk"

    with pytest.raises(ValueError, match=r"^router kind 'topk' is already registered by moejax\.routing\.topk\.TopK"):
        plugin.register_router(Impostor)
    assert plugin.router_kind("topk").__module__ == "moejax.routing.topk"
