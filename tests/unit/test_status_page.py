"""The fleet's picture (operations/monitoring/status_page.py) drawn from Prometheus' answers captured
on the lab (tests/data/prometheus/, with the command that took them): valid SVG, a cell per target
coloured by its health, each firing alert listed, a line per series of each chart."""

import json
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from operations.monitoring import status_page

DATA = Path(__file__).resolve().parents[1] / "data" / "prometheus"
SVG = "{http://www.w3.org/2000/svg}"


def _captured(name):
    return json.loads((DATA / name).read_text())["data"]


def _picture():
    charts = {title: _captured(f"query-range-{index}.json")["result"] for index, title in enumerate(status_page.CHARTS)}
    text = status_page.render(
        "the lab", _captured("targets.json")["activeTargets"], _captured("alerts.json")["alerts"], charts
    )
    return ElementTree.fromstring(text), text


def test_every_target_is_a_cell_coloured_by_its_health():
    svg, _ = _picture()
    targets = _captured("targets.json")["activeTargets"]
    cells = [rect.get("fill") for rect in svg.iter(f"{SVG}rect") if rect.get("width") == "100"]
    expected = [status_page.STATE_COLOURS[t["health"]] for t in targets]
    assert sorted(cells) == sorted(expected)
    assert "down" in {t["health"] for t in targets}  # the capture has the air-gapped host, which nothing reaches
    texts = [text.text for text in svg.iter(f"{SVG}text")]
    assert {t["labels"]["host"] for t in targets} <= set(texts)


def test_each_firing_alert_is_listed_and_each_series_drawn():
    svg, text = _picture()
    firing = [a for a in _captured("alerts.json")["alerts"] if a["state"] == "firing"]
    assert firing and all(alert["labels"]["alertname"] in text for alert in firing)
    lines = list(svg.iter(f"{SVG}polyline"))
    series = sum(len(_captured(f"query-range-{index}.json")["result"]) for index in range(len(status_page.CHARTS)))
    assert len(lines) == series > 0
