"""In a real browser: Label Studio's labeling page shows the backend's prediction as a mask.

A headless Chromium (Debian's /usr/bin/chromium, see scripts/install-test-deps) is driven over
the Chrome DevTools Protocol with websocket-client: no chromedriver, nothing downloaded. The test
logs in through Label Studio's login form, opens the Data Manager's labeling view of a task whose
prediction came from the real worker, waits until the editor lists the predicted regions and the
red brush (the config's #ff0000) is painted over the image, and saves the screenshot as
test-artifacts/labeling_page.png. The negative control is the same image in a project without an
ML backend (test-artifacts/labeling_page_control.png): there the only red is the photo's own.
"""

from __future__ import annotations

import base64
import contextlib
import io
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from .labelstudio import PASSWORD, USERNAME
from .services import DATA, REPO, wait_for
from .test_e2e_labelstudio import ls, stack  # noqa: F401  (module fixtures reused)

import websocket  # noqa: E402  (websocket-client, in the test extra)

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "test-artifacts"
VIEWPORT = (1600, 1000)
PAGE_TIMEOUT = 180.0  # seconds: Label Studio's frontend is heavy on 2 slow cores



# --------------------------------------------------------------------------------------------
# A minimal Chrome DevTools Protocol client


class Browser:
    """A headless Chromium with one page, driven over CDP."""

    def __init__(self) -> None:
        if not CHROMIUM.exists():
            raise RuntimeError(f"{CHROMIUM} is missing: run scripts/install-test-deps (Debian's chromium)")
        self.profile = Path(tempfile.mkdtemp(prefix="e2e-chromium-"))
        self.log = open(self.profile / "chromium.log", "wb")  # noqa: SIM115 - lives as long as Chromium
        self.process = subprocess.Popen(
            [str(CHROMIUM), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--disable-extensions",
             "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
             f"--user-data-dir={self.profile}", "--remote-debugging-address=127.0.0.1",
             "--remote-debugging-port=0", f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.ws = None
        self._ids = itertools.count(1)
        try:
            self._connect()
        except BaseException:
            self.close()
            raise

    def _connect(self) -> None:
        active = self.profile / "DevToolsActivePort"  # Chromium writes its port here once listening
        wait_for(lambda: self.process.poll() is None and len(active.read_text().split()) == 2, 60,
                 "Chromium's DevTools port")
        if self.process.poll() is not None:
            raise RuntimeError(f"Chromium exited with {self.process.returncode}: {self.log_tail()}")
        port = int(active.read_text().split()[0])
        pages: list[dict[str, Any]] = []

        def page_target() -> bool:
            pages[:] = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=5).json()
                        if t.get("type") == "page"]
            return bool(pages)

        wait_for(page_target, 30, "Chromium's first page")
        # suppress_origin: Chromium refuses DevTools websockets that send an Origin header.
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=60,
                                              suppress_origin=True, enable_multithread=False)
        self.call("Page.enable")
        self.call("Runtime.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=VIEWPORT[0], height=VIEWPORT[1],
                  deviceScaleFactor=1, mobile=False)

    def log_tail(self, chars: int = 3000) -> str:
        self.log.flush()
        return (self.profile / "chromium.log").read_text(errors="replace")[-chars:]

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command; return its result (events in between are dropped)."""
        assert self.ws is not None
        ident = next(self._ids)
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"CDP {method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JS error in {expression[:80]!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def goto(self, url: str) -> None:
        answer = self.call("Page.navigate", url=url)
        if answer.get("errorText"):
            raise RuntimeError(f"navigating to {url}: {answer['errorText']}")
        wait_for(lambda: self.evaluate("document.readyState") == "complete"
                 and self.evaluate("location.href") != "about:blank", PAGE_TIMEOUT, f"{url} to load")

    def screenshot(self) -> Image.Image:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")

    def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                self.ws.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        # its helpers (renderer, GPU, zygote) share its process group (start_new_session)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture
def browser():
    instance = Browser()
    yield instance
    instance.close()


# --------------------------------------------------------------------------------------------
# Label Studio pages


def log_in(browser: Browser, url: str) -> None:
    """Through Label Studio's own login form (email + password, Django session cookie)."""
    browser.goto(f"{url}/user/login/")
    wait_for(lambda: browser.evaluate("!!document.querySelector('#login-form input[name=email]')"),
             PAGE_TIMEOUT, "the login form")
    browser.evaluate(f"""(() => {{
        const form = document.querySelector('#login-form');
        form.querySelector('input[name=email]').value = {json.dumps(USERNAME)};
        form.querySelector('input[name=password]').value = {json.dumps(PASSWORD)};
        form.submit();
    }})()""")
    wait_for(lambda: "/user/login" not in browser.evaluate("location.pathname")
             and browser.evaluate("document.readyState") == "complete", PAGE_TIMEOUT, "the login to finish")


# The editor's state, read from the DOM: the Konva stage (the image object's canvases; its box is
# where the photo and the regions are drawn), whether the photo is loaded (a large <img>: the Data
# Manager's thumbnails are small), whether a loader or the editor's "waiting" veil is up (it washes
# the whole view out while a task or an annotation loads), and how many brush regions the outliner
# lists. Label Studio Frontend's class names carry an "lsf-" prefix.
EDITOR_STATE = """(() => {
    const shown = e => { const s = getComputedStyle(e); return s.display !== 'none' && s.visibility !== 'hidden'; };
    const stage = document.querySelector('.konvajs-content');
    const box = stage ? stage.getBoundingClientRect() : null;
    const photo = [...document.querySelectorAll('img')].some(
        i => i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width > 300);
    const busy = [...document.querySelectorAll('.lsf-label-view_loading, .lsf-label-view__waiting, '
        + '.lsf-image-progress, .lsf-app-loader, .lsf-spinner-ls')].some(shown);
    return {stage: box ? [box.left, box.top, box.right, box.bottom] : null, photo: photo, busy: busy,
            brushes: document.querySelectorAll('.lsf-tree__node_type_brushregion').length};
})()"""


def red_mask(image: Image.Image, box: list[float]) -> np.ndarray:
    """Where red clearly dominates, inside ``box`` (the stage): the #ff0000 brush at its display
    opacity (under the polygon's and the box's lighter fills it stays about (216, 83, 19))."""
    left, top, right, bottom = (round(v) for v in box)
    a = np.asarray(image.crop((left, top, right, bottom)), dtype=np.int32)
    return (a[..., 0] > 150) & (a[..., 1] < 100) & (a[..., 2] < 100)


def open_task(browser: Browser, url: str, project_id: int, task_id: int) -> dict[str, Any]:
    """Open a task's labeling view; return the editor's state once it is idle and its screenshot
    stops changing (two in a row alike), with that screenshot as ``state["shot"]``."""
    browser.goto(f"{url}/projects/{project_id}/data?task={task_id}")
    state: dict[str, Any] = {}

    def settled() -> bool:
        state.update(browser.evaluate(EDITOR_STATE))
        if not (state["stage"] and state["photo"]) or state["busy"]:
            state.pop("shot", None)
            return False
        shot, previous = browser.screenshot(), state.get("shot")
        state["shot"] = shot
        return previous is not None and previous.tobytes() == shot.tobytes()

    wait_for(settled, PAGE_TIMEOUT, f"the labeling view of task {task_id} to show its image and settle")
    return state


# --------------------------------------------------------------------------------------------


def test_labeling_page_shows_the_predicted_mask(ls, stack, browser):  # noqa: F811
    config = (REPO / "label_config" / "batch_prompts.xml").read_text()
    shutil.copy(DATA / "dog.jpg", ls.images_dir / "dog.jpg")
    task = {"image": ls.local_files_url("dog.jpg"), "prompt": "the dog"}
    project = ls.create_project("e2e browser", config)
    ls.add_local_storage(project["id"])
    [task_id] = ls.import_tasks(project["id"], [task])
    ls.connect_ml_backend(project["id"], stack["url"], is_interactive=True)
    ls.retrieve_predictions(project["id"], [task_id])
    wait_for(lambda: len(ls.predictions(task_id)) == 1, 300, "the task's prediction")
    [prediction] = ls.predictions(task_id)
    assert [r["type"] for r in prediction["result"]].count("brushlabels") == 1, prediction
    # The negative control: the same image in a project without an ML backend. (In the first
    # project, opening a task without a prediction would make Label Studio ask the backend for
    # one: show_collab_predictions is on by default.)
    control_project = ls.create_project("e2e browser control", config)
    ls.add_local_storage(control_project["id"])
    [control_id] = ls.import_tasks(control_project["id"], [task])

    log_in(browser, ls.url)
    ARTIFACTS.mkdir(exist_ok=True)

    control_state = open_task(browser, ls.url, control_project["id"], control_id)
    control = control_state["shot"]
    control.save(ARTIFACTS / "labeling_page_control.png")
    assert control_state["brushes"] == 0 and ls.predictions(control_id) == [], control_state
    control_red = red_mask(control, control_state["stage"])

    state = open_task(browser, ls.url, project["id"], task_id)
    shot = state.pop("shot")

    def mask_painted() -> bool:
        nonlocal shot
        if not state["busy"] and state["brushes"] == 1 and added_red(shot) > 500:
            return True
        state.update(browser.evaluate(EDITOR_STATE))
        shot = browser.screenshot()
        return False

    def added_red(image: Image.Image) -> int:
        red = red_mask(image, state["stage"])
        # Same layout (same config, image and viewport), so pixels compare one to one; the photo's
        # own red (the bowl's rim, the tongue), in both, drops out.
        return int((red & ~control_red).sum()) if red.shape == control_red.shape else 0

    try:
        wait_for(mask_painted, PAGE_TIMEOUT, "the predicted mask to be painted")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; last state {state}, red pixels added {added_red(shot)} "
                             "(see test-artifacts/labeling_page.png)") from exc
    finally:
        shot.save(ARTIFACTS / "labeling_page.png")
    assert state["stage"] == control_state["stage"], (state, control_state)
    # Without the prediction the only red is the photo's own (a few hundred pixels at most).
    print(f"\nred pixels over the image: {int(control_red.sum())} without the prediction, "
          f"{added_red(shot)} more with it")
    assert control_red.sum() < 2000
