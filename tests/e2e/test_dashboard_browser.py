"""The dashboard in a real browser: Debian's headless Chromium driven by selenium, against the
real server process, a real Mosquitto and 20 simulated devices running the agent's install
pipeline. An operator signs in, watches the fleet and a rollout's waves fill in live, pauses
and resumes it from the page; a viewer sees the same pages and is refused the actions. The
test writes the screenshots README shows (docs/img/)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator

import pytest

from tests._cli import ROOT
from tests._fleet import Fleet, simulate, up
from tests._services import needs_mosquitto, wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="Debian's chromium and chromium-driver are not installed (make system-deps installs them)",
)
pytestmark = [pytest.mark.slow, needs_mosquitto, needs_chromium]

DEVICES = 20
SCREENSHOTS = ROOT / "docs" / "img"
BEHAVIOURS = {
    "*": {"latency_ms": 5.0, "latency_spread": 0.2, "infer_sleeps": False},
    "2.0.0": {"latency_ms": 4.0},
}


@pytest.fixture
def browser() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def tokens(fleet: Fleet) -> dict[str, str]:
    viewer, grant = fleet.new_token("viewer", "viewer-1")
    fleet.write_server_config([grant])  # the operator's token is made here too
    return {"operator": fleet.token, "viewer": viewer}


@pytest.fixture
def simulated(fleet: Fleet, tokens, releases):
    configs = fleet.add_sim_devices(DEVICES, "field")
    up(fleet)
    fleet.publish(releases["1.0.0"], releases["2.0.0"])
    sim = simulate(fleet, configs, BEHAVIOURS)
    yield sim
    sim.stop()


def _sign_in(driver, fleet: Fleet, token: str, page: str) -> None:
    from selenium.webdriver.common.by import By

    driver.delete_all_cookies()
    driver.get(f"http://127.0.0.1:{fleet.http_port}{page}")
    assert "/ui/login" in driver.current_url  # no session: the sign-in page first
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "sign-in").click()
    assert wait_for(lambda: driver.current_url.endswith(page), 10), driver.current_url


def _attr(driver, css: str, name: str) -> str | None:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        return driver.find_element(By.CSS_SELECTOR, css).get_attribute(name)
    except (NoSuchElementException, StaleElementReferenceException):
        return None


def _text(driver, element_id: str) -> str:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        return str(driver.find_element(By.ID, element_id).text)
    except (NoSuchElementException, StaleElementReferenceException):
        return ""


def _plotted(driver) -> bool:
    """The latency, request-rate and error-rate plots have drawn points (uPlot's canvas and the
    page's count; PSI needs enough values per window first, so it may still be empty)."""
    return bool(
        driver.execute_script(
            "const p = [...document.querySelectorAll('.plot')]"
            ".filter(e => ['latency', 'rate', 'errors'].includes(e.dataset.plot));"
            "return p.length === 3"
            " && p.every(e => e.querySelector('canvas') && Number(e.dataset.points) > 0);"
        )
    )


def _rows_text(driver, css: str) -> list[str]:
    """The rows' text, read in one script (the page redraws its tables every 2 s)."""
    return list(
        driver.execute_script(f"return [...document.querySelectorAll('{css}')].map(r => r.innerText);")
    )


def test_operator_watches_a_rollout_live_and_steers_it_a_viewer_cannot(
    fleet: Fleet, simulated, tokens, browser
):
    from selenium.webdriver.common.by import By

    driver = browser
    first = fleet.rollout("digits:1.0.0", "--group", "field", "--waves", "100%", "--bake", "1s")
    assert wait_for(lambda: fleet.rollout_status(first)["state"] == "completed", 120)

    # the fleet page: every device, its release and telemetry, and plots over time
    _sign_in(driver, fleet, tokens["operator"], "/ui/fleet")
    rows = "#fleet-table tbody tr"
    assert wait_for(lambda: len(driver.find_elements(By.CSS_SELECTOR, rows)) == DEVICES, 20)
    assert "operator-" not in driver.page_source  # the credential never reaches the page
    assert wait_for(lambda: all("digits:1.0.0" in r for r in _rows_text(driver, rows)), 30)
    assert wait_for(lambda: _plotted(driver), 30)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SCREENSHOTS / "dashboard-fleet.png"))

    # a rollout page, opened before the waves fill: they fill in without a reload
    rollout = fleet.rollout("digits:2.0.0", "--group", "field", "--waves", "10%,50%,100%", "--bake", "4s")
    driver.get(f"http://127.0.0.1:{fleet.http_port}/ui/rollouts/{rollout}")
    driver.execute_script("window.__sameDocument = true;")
    first_seen = int(_attr(driver, '.wave[data-wave="1"]', "data-installed") or 0)
    assert wait_for(lambda: int(_attr(driver, '.wave[data-wave="1"]', "data-installed") or 0) == 2, 60)
    assert first_seen < 2 or fleet.rollout_status(rollout)["wave"] == 1
    assert driver.execute_script("return window.__sameDocument === true;")  # live, not reloaded

    # pause from the page: the server's state changes, and the page shows it
    driver.find_element(By.ID, "action-pause").click()
    assert wait_for(lambda: fleet.rollout_status(rollout)["state"] == "paused", 15)
    assert wait_for(lambda: _text(driver, "state") == "paused", 10)
    wave_when_paused = fleet.rollout_status(rollout)["wave"]
    time.sleep(5)  # longer than a bake: a paused rollout starts no wave
    assert fleet.rollout_status(rollout)["wave"] == wave_when_paused
    driver.find_element(By.ID, "action-resume").click()
    assert wait_for(lambda: fleet.rollout_status(rollout)["state"] in ("running", "completed"), 15)
    assert wait_for(lambda: _text(driver, "state") == "completed", 120), fleet.rollout_status(rollout)
    assert wait_for(
        lambda: (
            int(_attr(driver, '.wave[data-wave="3"]', "data-installed") or 0)
            == int(_attr(driver, '.wave[data-wave="3"]', "data-devices") or -1)
        ),
        30,
    )
    assert wait_for(lambda: _plotted(driver), 30)
    driver.save_screenshot(str(SCREENSHOTS / "dashboard-rollout.png"))

    # the audit page shows who paused and resumed it from here, and that the chain is intact
    driver.get(f"http://127.0.0.1:{fleet.http_port}/ui/audit")
    rows = _rows_text(driver, "#audit-table tbody tr")
    for action in ("rollout.pause", "rollout.resume"):
        assert any(action in r and "operator" in r and r.rstrip().endswith("ok") for r in rows), rows
    assert _text(driver, "chain").startswith("chain intact")

    # a viewer sees the pages, has no buttons, and the server refuses the action anyway
    _sign_in(driver, fleet, tokens["viewer"], f"/ui/rollouts/{rollout}")
    assert _text(driver, "state") == "completed"
    assert not driver.find_elements(By.ID, "actions")
    status = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "const csrf = document.querySelector('meta[name=\"csrf-token\"]').content;"
        f"fetch('/ui/rollouts/{rollout}/rollback', {{method: 'POST', headers: {{'X-CSRF-Token': csrf}}}})"
        ".then(r => done(r.status));"
    )
    assert status == 403
    assert fleet.rollout_status(rollout)["state"] == "completed"
