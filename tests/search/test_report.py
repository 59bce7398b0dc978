"""The search report: a self-contained HTML page with its figures, rendered by a real headless Chromium."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess

import matplotlib.image
import numpy as np

from mergesearch_operator.report import plan_figure, render, rung_results, write_report
from mergesearch_operator.spaces import DepthwiseIntegration
from tests.search.searches import EXPERTS, FACTS, make_controller, manifest, run_to_end

PNG = re.compile(r'src="data:image/png;base64,([^"]+)"')


def figures_of(page: str) -> list[np.ndarray]:
    return [matplotlib.image.imread(io.BytesIO(base64.b64decode(data)), format="png") for data in PNG.findall(page)]


def test_a_finished_search_reports_its_incumbent_rungs_plan_and_held_out_table(storage, executor):
    controller = make_controller(manifest(), storage, executor)
    status = run_to_end(controller)
    page = render(controller, "synthetic")
    titles = re.findall(r"<h2>([^<]+)</h2>", page)
    assert titles[:3] == ["Held-out test split: accuracy", "Incumbent", "Rungs"]
    assert titles[3].startswith(f"Best plan (best, trial {status.best.trial})")
    assert len(figures_of(page)) == 3 and all(f.shape[0] > 100 and f.shape[1] > 100 for f in figures_of(page))
    for label in status.final:  # every finalist has its row
        assert f"<td>{label}</td>" in page
    results = rung_results(controller)
    # every recorded rung result is drawn, with the decision stored for it
    recorded = sum(1 for t in controller.study.trials for key in t.user_attrs if key.startswith("result.r"))
    assert len(results) == recorded
    assert {r.decision for r in results} >= {"promote", "prune", "complete"}


def test_a_pareto_search_reports_its_front(storage, executor):
    controller = make_controller(manifest(search={"objectiveMode": "pareto"}), storage, executor)
    run_to_end(controller)
    page = render(controller, "synthetic")
    assert "<h2>Pareto front</h2>" in page and len(figures_of(page)) == 4


def test_a_dis_plan_is_drawn_as_its_layer_stack():
    space = DepthwiseIntegration(FACTS, max_depth=12)
    params = {f"p{p}.{e}": False for p in range(4) for e in EXPERTS} | {f"p{p}.scale": 1.0 for p in range(4)}
    params.update({"p1.sort": True, "p1.reverse": True, "p1.order.reverse+sort": "sort+reverse", "p1.scale": 1.1})
    figure = plan_figure(space.plan_of(params), list(EXPERTS))
    labels = [t.get_text() for t in figure.axes[0].texts]
    assert labels == ["base layer 0", "sort layer 1", "reverse layer 1 x1.10", "base layer 2", "base layer 3"]


def test_the_page_renders_with_its_figures_in_headless_chromium(storage, executor, tmp_path):
    chromium = shutil.which("chromium")
    assert chromium, (
        "no `chromium`: install it with `apt-get install -y --no-install-recommends chromium` (make test does)"
    )
    controller = make_controller(manifest(), storage, executor)
    run_to_end(controller)
    page = write_report(controller, "synthetic", tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    common = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files"]
    subprocess.run(
        [*common, f"--screenshot={shot}", "--window-size=1000,2600", page.as_uri()],
        check=True,
        capture_output=True,
        timeout=120,
    )
    pixels = matplotlib.image.imread(shot)[..., :3]
    # matplotlib's first colour (tab:blue, the incumbent's line and the completed trials' points) only
    # appears where the figures were drawn: a page whose images did not load has none of it
    blue = np.all(np.abs(pixels - np.array([31, 119, 180]) / 255) < 0.03, axis=-1)
    assert blue.sum() > 200, blue.sum()
    dom = subprocess.run(
        [*common, "--dump-dom", page.as_uri()], check=True, capture_output=True, text=True, timeout=120
    ).stdout
    assert dom.count("<img") == 3 and "Held-out test split" in dom
