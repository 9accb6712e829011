"""The chart render helper itself: a real helm renders the real chart with the values `invoke values` gives."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from appliance.config import ApplianceConfig
from appliance.values import generate_values
from tests.chart import objects_of_kind, render_chart_once


def test_real_chart_renders_with_our_values(helm_bin: Path, make_cfg: Callable[..., ApplianceConfig]) -> None:
    cfg = make_cfg("provision.skip=[]", "vm.cpus=4", "vm.memory_mb=8192")
    objects = render_chart_once(helm_bin, generate_values(cfg))
    deployments = {obj["metadata"]["name"] for obj in objects_of_kind(objects, "Deployment")}
    # The portal and the server are CSGHub's own templates: a render without them means the values broke the chart.
    assert {"csghub-portal", "csghub-server"} <= deployments
    gateways = list(objects_of_kind(objects, "Gateway"))
    assert gateways, "no Gateway rendered: routing (Gateway API) is missing"
    routes = [h for obj in objects_of_kind(objects, "HTTPRoute") for h in obj["spec"].get("hostnames", [])]
    assert any(h.endswith(cfg.csghub.domain) for h in routes), routes
