"""Look at a study in the MLflow UI the way a user does, headless, and keep screenshots.

    python scripts/mlflow_screenshots.py results/default --out docs/mlflow

Logs the study (idempotent: `harness log` with the study's resolved config), starts `mlflow
server` on 127.0.0.1 (the `mlflow ui` a user runs), waits for it, and saves PNGs taken by
headless Chromium driven by Selenium (pip `selenium`; Debian `chromium chromium-driver`): the runs table in the saved view "didbench: key
metrics", one model run's overview, its model-metric and system-metric charts, one metric of
every run on the metric page, and the view's charts of every run side by side. Nothing is asserted: look at the pictures (the note of issue 15 says what they show).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.core import methods  # noqa: E402
from harness.results import payloads, tracking  # noqa: E402
from harness.core.config import load_config  # noqa: E402

DRIVERS = ("/usr/bin/chromedriver", "chromedriver")


def browser():
    """Headless Chromium through Selenium (pip selenium, Debian chromium + chromium-driver)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        sys.exit("error: needs selenium (pip install selenium) and Chromium with its driver "
                 "(Debian: apt-get install chromium chromium-driver)")
    driver = next((d for d in DRIVERS if shutil.which(d)), None)
    if driver is None:
        sys.exit("error: no chromedriver found (Debian: apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(shutil.which(driver)), options=opts)


def resolved_config(study_dir: Path) -> Path:
    files = sorted((study_dir / "config").glob("*.yaml"), key=lambda f: f.stat().st_mtime)
    if not files:
        sys.exit(f"error: {study_dir}/config/ has no resolved study config: run the workflow first")
    return files[-1]


def wait_for(url: str, seconds: float = 90) -> None:
    end = time.time() + seconds
    while time.time() < end:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    sys.exit(f"error: the MLflow server did not answer at {url} within {seconds:.0f} s")


def _click_all(drv, css: str) -> int:
    from selenium.webdriver.common.by import By

    n = 0
    for el in drv.find_elements(By.CSS_SELECTOR, css):
        try:
            el.click()
            n += 1
        except Exception:  # noqa: BLE001 - hidden or detached: nothing to click
            pass
    return n


def shoot(drv, url: str, out: Path, wait_s: float, expand: bool = False, hide_parent: bool = False,
          ready: str = "canvas, svg.main-svg, [role='gridcell'], table") -> None:
    """Open `url`, close the assistant panel, expand the parent run (and hide it from the charts,
    with its eye icon: it has no curves) if asked, save a PNG."""
    from selenium.webdriver.common.by import By

    drv.get("about:blank")
    drv.get(url)
    end = time.time() + 30                                   # until the page shows its data
    while time.time() < end and not drv.find_elements(By.CSS_SELECTOR, ready):
        time.sleep(1)
    time.sleep(wait_s)
    _click_all(drv, "[data-component-id='mlflow.assistant.chat_panel.close']")
    if expand:   # the expander of a parent run's row (the study run)
        _click_all(drv, "div[role='gridcell'][col-id='attributes.`Run Name`'] button, "
                        "[role='gridcell'] button[data-component-id*='runnamecellrenderer']")
    if hide_parent:   # the first row is the parent (the study run)
        toggles = drv.find_elements(By.CSS_SELECTOR, "label:has(> input.is-visibility-toggle-checkbox)")
        if toggles:
            toggles[0].click()
    time.sleep(2)
    drv.save_screenshot(str(out))
    print(f"{out}  <-  {url}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study_dir", type=Path, help="results/<study> (trained and evaluated)")
    p.add_argument("--out", type=Path, default=Path("docs/mlflow"), help="folder for the PNG files")
    p.add_argument("--port", type=int, default=5077)
    p.add_argument("--size", default="2400,1300", help="browser window, width,height in pixels")
    p.add_argument("--wait-s", type=float, default=5.0, help="seconds each page gets to render once its data show")
    args = p.parse_args(argv)

    summary = tracking.log_study(args.study_dir, load_config(str(resolved_config(args.study_dir))))
    uri, exp_id = summary["tracking_uri"], summary["experiment_id"]
    print("logged:", json.dumps({k: summary[k] for k in ("logged", "skipped", "replaced", "completed", "runs")}))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = {r.info.run_name: r for r in client.search_runs([exp_id], max_results=1000)}
    model_runs = sorted(n for n in runs if n != payloads.STUDY_RUN)
    reference = methods.reference_methods().get("varlen", "")   # the run the screenshots open: DID's
    pick = next((n for n in model_runs if n.startswith(f"{reference}-varlen")), model_runs[0])
    rid = runs[pick].info.run_id

    mlflow_bin = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen([str(mlflow_bin), "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
                               "--port", str(args.port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        host = f"http://127.0.0.1:{args.port}"
        wait_for(f"{host}/health")
        drv, out = browser(), args.out
        w, h = (int(x) for x in args.size.split(","))
        drv.set_window_size(w, h)
        out.mkdir(parents=True, exist_ok=True)
        try:
            shoot(drv, tracking.view_url(exp_id, host), out / "runs-table.png", args.wait_s, expand=True)
            shoot(drv, f"{host}/#/experiments/{exp_id}/runs/{rid}", out / "run-overview.png", args.wait_s)
            shoot(drv, f"{host}/#/experiments/{exp_id}/runs/{rid}/model-metrics", out / "run-metrics.png", args.wait_s)
            shoot(drv, f"{host}/#/experiments/{exp_id}/runs/{rid}/system-metrics", out / "run-system-metrics.png",
                  args.wait_s)
            ids = json.dumps([runs[n].info.run_id for n in model_runs if "varlen" in n] or
                             [runs[n].info.run_id for n in model_runs])
            key = "train/valid_nats_per_token"
            q = urllib.parse.quote
            metric_page = (f"{host}/#/metric/{q(key, safe='')}?runs={ids}&metric={q(json.dumps(key))}&experiments={json.dumps([exp_id])}"
                           f"&plot_metric_keys={q(json.dumps([key]))}&plot_layout={{}}&x_axis=step&y_axis_scale=linear"
                           "&line_smoothness=1&show_point=true&deselected_curves=[]&last_linear_y_axis_range=[]")
            shoot(drv, metric_page.replace(" ", ""), out / "compare-valid-bound.png", args.wait_s)
            shoot(drv, tracking.view_url(exp_id, host, charts=True), out / "compare-charts.png", args.wait_s,
                  expand=True, hide_parent=True)
        finally:
            drv.quit()
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
