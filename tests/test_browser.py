"""The dashboard in a real browser: `lab dashboard` on a free local port, started exactly as a user
starts it (no extra flags), Debian's Chromium driven by playwright (no browser download). Opens
every page, waits for the plotly charts to render, types a sentence on the Attention page and checks
the heatmap's labels follow, scrubs the checkpoint slider, types a long sentence, checks that the
page asks nothing of any other host (no usage statistics) and shows no Streamlit pop-up, and saves a
screenshot of each step under a folder it prints ($LAB_SCREENSHOTS_DIR, or a temp dir).

Without Chromium or playwright the test skips with a one-line reason; under CI=true it fails instead.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import dashboard_runs
import lab
from lab.runs.storage import acquire_writer
import sweep_runs

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1366, "height": 900}  # a laptop screen
RENDER_TIMEOUT_MS = 120_000  # a page with a plotly chart takes ~7 s on an idle machine; CI machines are busy


def _browser_or_skip() -> None:
    reason = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        reason = "the playwright Python package is not installed (pip install -e '.[dev]')"
    if reason is None and not os.access(CHROMIUM, os.X_OK):
        reason = f"no Chromium at {CHROMIUM} (on Debian/Ubuntu: apt install chromium)"
    if reason:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true, so the browser test must run, but {reason}")
        pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_live_run(live: Path, source: Path):
    """A copy of a finished run that looks as if training were at its second evaluation. Returns the run's
    writer lock, held by this process as a trainer would hold it (a run whose writer is gone shows as
    interrupted, not running)."""
    shutil.copytree(source, live)
    (live / ".lock").unlink(missing_ok=True)
    lines = (live / "metrics.jsonl").read_text().splitlines(keepends=True)
    (live / "metrics.jsonl").write_text("".join(lines[:2]))
    (live / "rest.jsonl").write_text("".join(lines[2:]))  # what "training" appends later
    summary = json.loads((live / "summary.json").read_text())
    summary.update(status="running", step=json.loads(lines[1])["step"], updated_at=time.time() + 60)
    (live / "summary.json").write_text(json.dumps(summary))
    return acquire_writer(live)


def _finish_live_run(live: Path, writer) -> None:
    with open(live / "metrics.jsonl", "a") as f:
        f.write((live / "rest.jsonl").read_text())
    summary = json.loads((live / "summary.json").read_text())
    summary.update(status="finished", step=summary["steps"])
    (live / "summary.json").write_text(json.dumps(summary))
    writer.release()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    _browser_or_skip()
    shared, made = dashboard_runs.shared_runs(tmp_path_factory)
    folder = tmp_path_factory.mktemp("browser_runs")
    for name in ("mod23", "ab"):
        shutil.copytree(shared / name, folder / name)
    live_writer = _start_live_run(folder / "live", shared / "ab")
    shutil.copytree(sweep_runs.shared_sweep(tmp_path_factory), folder / sweep_runs.SWEEP_NAME)
    port = _free_port()
    log_path = tmp_path_factory.mktemp("dashboard_server") / "server.log"
    log = open(log_path, "w")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "lab.cli", "dashboard", "--runs-dir", str(folder), "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"lab dashboard did not come up on {url}:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)
    yield url, folder, live_writer
    process.terminate()  # `lab dashboard` alone: it must stop its streamlit server itself
    try:
        process.wait(timeout=20)
        deadline = time.monotonic() + 15
        while _servers_on(port) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _servers_on(port), "lab dashboard left its streamlit server running after SIGTERM"
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # whatever is left of its session
        except ProcessLookupError:
            pass
        log.close()


def _servers_on(port: int) -> list[int]:
    """Pids of streamlit servers started for this port (read from /proc)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"streamlit" in b" ".join(args) and str(port).encode() in args:
            pids.append(int(cmdline.parent.name))
    return pids


@pytest.fixture(scope="module")
def shots(tmp_path_factory, request):
    folder = Path(os.environ.get("LAB_SCREENSHOTS_DIR") or tmp_path_factory.mktemp("dashboard_screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\ndashboard screenshots: {folder}")
    return folder


def _settle(page) -> None:
    """Wait until Streamlit has finished the script run and every plotly chart on the page has drawn."""
    page.wait_for_selector(".js-plotly-plot .main-svg", timeout=RENDER_TIMEOUT_MS)
    page.wait_for_function(
        """() => !document.querySelector('[data-testid="stStatusWidget"]')
                 && [...document.querySelectorAll('.js-plotly-plot')].every(gd => gd._fullLayout && gd.querySelector('.main-svg'))""",
        timeout=RENDER_TIMEOUT_MS,
    )
    page.wait_for_timeout(500)


def _heatmap(page) -> dict:
    """The attention grid's tick labels and title, read from the plotly graph div."""
    return page.evaluate(
        """() => { const gd = [...document.querySelectorAll('.js-plotly-plot')]
                     .find(g => g.layout && (g.layout.title.text || '').includes('attention per head'));
                   return gd ? {x: gd.layout.xaxis.ticktext, title: gd.layout.title.text} : null; }"""
    )


def _shoot(page, path: Path) -> None:
    """A screenshot of the whole page: Streamlit scrolls inside its main block, so grow the window to fit it."""
    height = page.evaluate("() => { const m = document.querySelector('[data-testid=\"stMain\"]');"
                           " return m ? m.scrollHeight : document.body.scrollHeight; }")
    page.set_viewport_size({"width": VIEWPORT["width"], "height": max(VIEWPORT["height"], min(int(height), 8000))})
    page.wait_for_timeout(700)  # plotly redraws on resize
    page.screenshot(path=str(path))
    page.set_viewport_size(VIEWPORT)


def _table_rows(page) -> list[dict]:
    """The Runs table's rows as the browser shows them (its accessible copy of the canvas): the run's name
    as the sidebar writes it (SWEEP/MEMBER), whether its row is ticked, and its row number."""
    return page.locator('[data-testid="stDataFrame"] table[role="grid"]').first.evaluate(
        """t => [...t.querySelectorAll('tbody tr')].map(tr => { const c = [...tr.querySelectorAll('td')].map(td => td.textContent);
              return {name: c[0] && c[0] !== '—' ? c[0] + '/' + c[1] : c[1], ticked: tr.getAttribute('aria-selected') === 'true',
                      row: Number(tr.getAttribute('aria-rowindex')) - 2}; })""")


def _sidebar_runs(page) -> list[str]:
    return page.locator('[data-testid="stSidebar"] [data-testid="stMultiSelectTagsContainer"] [data-tag]').evaluate_all(
        "tags => tags.map(t => t.getAttribute('aria-label'))")


def _tick(page, row: int) -> None:
    """Click the tick box of a row of the Runs table (rows are 35 px; the header is one)."""
    box = page.locator('[data-testid="stDataFrame"]').first.bounding_box()
    page.mouse.click(box["x"] + 16, box["y"] + 35 * (row + 1) + 17)


def _wait_for(page, what: str, check, timeout_s: float = RENDER_TIMEOUT_MS / 1000):
    deadline = time.monotonic() + timeout_s
    while not (value := check()) and time.monotonic() < deadline:
        page.wait_for_timeout(200)
    assert value, f"timed out waiting for {what}"
    return value


def _runs_selection_both_ways(page, folder: Path, shots: Path) -> None:
    """Ticking rows changes the sidebar and the Curves page; a run removed in the sidebar is unticked.
    Every row is drawn (11 runs, eight of them members of one sweep, told apart by their names)."""
    rows = _table_rows(page)
    names = [row["name"] for row in rows]
    assert sorted(names) == sorted(r["name"] for r in lab.list_runs(folder)) and len(names) == 11
    assert len({row["name"].split("/")[-1] for row in rows}) == 11  # sweep members differ in the run column
    scroller = page.locator('[data-testid="stDataFrame"] .dvn-scroller').first
    heights = scroller.evaluate("e => [e.scrollHeight, e.clientHeight]")
    assert heights[0] <= heights[1] + 1, f"the last rows hide below the table's edge: {heights}"
    assert page.get_by_text("11 of 11 runs shown").count() == 1
    selected = _sidebar_runs(page)
    assert selected and [r["name"] for r in rows if r["ticked"]] == [n for n in names if n in selected]

    untick = next(r for r in rows if r["ticked"])
    tick = next(r for r in rows if not r["ticked"] and r["name"] == "mod23")
    _tick(page, tick["row"])
    _wait_for(page, "mod23 in the sidebar", lambda: "mod23" in _sidebar_runs(page))
    _tick(page, untick["row"])
    _wait_for(page, f"{untick['name']} out of the sidebar", lambda: untick["name"] not in _sidebar_runs(page))
    expected = [n for n in selected if n != untick["name"]] + ["mod23"]
    assert _sidebar_runs(page) == expected
    # the table redraws after the sidebar (a rerun, and the live run's refresh, may land in between)
    _wait_for(page, f"the table's ticks to be {expected}",
              lambda: {r["name"] for r in _table_rows(page) if r["ticked"]} == set(expected))
    _shoot(page, shots / "0_runs_ticked.png")

    page.get_by_role("link", name="Curves").click()  # the app's own navigation: the same session
    page.get_by_role("heading", name="Curves").first.wait_for(timeout=RENDER_TIMEOUT_MS)
    _settle(page)
    traces = page.evaluate("() => [...new Set(document.querySelector('.js-plotly-plot').data.map(t => t.name))]")
    assert {t.rsplit(" ", 1)[0] for t in traces} == set(expected), traces

    page.locator('[data-testid="stSidebar"] [data-tag]').filter(has_text="mod23").locator("button").click()
    page.get_by_role("link", name="Runs").click()
    page.get_by_role("heading", name="Runs").first.wait_for(timeout=RENDER_TIMEOUT_MS)
    _settle(page)
    ticked = _wait_for(page, "the table to follow the sidebar",
                       lambda: {r["name"] for r in _table_rows(page) if r["ticked"]} == set(expected) - {"mod23"} or None)
    assert ticked and "mod23" not in _sidebar_runs(page)


def _no_exception(page) -> None:
    assert page.locator('[data-testid="stException"]').count() == 0, page.locator('[data-testid="stException"]').first.inner_text()


def test_dashboard_in_a_browser(server, shots):
    from playwright.sync_api import sync_playwright

    url, folder, live_writer = server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(RENDER_TIMEOUT_MS)  # clicks and navigation too, not only the waits
            elsewhere = []  # requests to any other host than the dashboard's (usage statistics, fonts, CDNs)
            page.on("request", lambda request: None if request.url.startswith((url, "data:", "blob:"))
                    else elsewhere.append(request.url))

            # A run still training: its curve grows on the Runs page without a reload.
            page.goto(url)
            _settle(page)
            live_points = """() => { const g = document.querySelector('.js-plotly-plot');
                const t = g && g._fullData.find(t => t.name === 'live test'); return t ? t._length : -1; }"""
            assert page.evaluate(live_points) == 1  # steps 0 and 20; step 0 is off the log axis
            assert page.get_by_text("Help agents write better apps").count() == 0  # Streamlit's pop-up is off
            # The runs table fits the page: no column (the "updated" one last) cut off behind a scroll bar.
            scroller = page.locator('[data-testid="stDataFrame"] .dvn-scroller').first
            widths = scroller.evaluate("e => [e.scrollWidth, e.clientWidth]")
            assert widths[0] <= widths[1] + 1, f"the runs table scrolls sideways: {widths}"
            _finish_live_run(folder / "live", live_writer)
            page.wait_for_function(f"() => ({live_points})() === 3", timeout=RENDER_TIMEOUT_MS)
            _runs_selection_both_ways(page, folder, shots)

            for n, (path, title) in enumerate([("", "Runs"), ("curves", "Curves"), ("attention", "Attention"),
                                               ("progress", "Progress measures"), ("heads", "Heads"),
                                               ("circuits", "Circuits"), ("sweeps", "Sweeps")], start=1):
                page.goto(f"{url}/{path}")
                page.get_by_role("heading", name=title).first.wait_for(timeout=RENDER_TIMEOUT_MS)
                _settle(page)
                _no_exception(page)
                assert page.locator(".js-plotly-plot").count() >= 1, f"no chart on {title}"
                _shoot(page, shots / f"{n}_{path or 'runs'}.png")

            # Attention: the a_and_b run, a typed sentence, then the checkpoint slider scrubbed to step 0.
            page.goto(f"{url}/attention")
            page.get_by_role("heading", name="Attention").first.wait_for(timeout=RENDER_TIMEOUT_MS)
            _settle(page)
            if (_heatmap(page) or {}).get("x", [None])[0] != "<cls>":
                page.locator('[data-testid="stSelectbox"]').first.click()
                page.get_by_role("option", name="ab", exact=True).click()
                page.wait_for_function("() => { const g = document.querySelector('.js-plotly-plot');"
                                       " return g && g.layout && g.layout.xaxis.ticktext[0] === '<cls>'; }",
                                       timeout=RENDER_TIMEOUT_MS)
                _settle(page)
            before = _heatmap(page)
            assert before["x"][0] == "<cls>"
            sentence = page.get_by_label("Sentence", exact=True).and_(page.locator("input"))
            sentence.fill("bbc cab")
            sentence.press("Enter")
            page.wait_for_function(
                "() => { const g = [...document.querySelectorAll('.js-plotly-plot')].find(g => g.data[0].type === 'heatmap');"
                " return g && g.layout.xaxis.ticktext.join('') === '<cls>bbc␣cab'; }",
                timeout=RENDER_TIMEOUT_MS,
            )
            _settle(page)
            after = _heatmap(page)
            assert after["x"] == ["<cls>", "b", "b", "c", "␣", "c", "a", "b"] and after["x"] != before["x"]
            _shoot(page, shots / "6_attention_typed.png")

            page.get_by_role("slider").first.focus()
            page.keyboard.press("Home")
            page.wait_for_function(
                "() => { const g = [...document.querySelectorAll('.js-plotly-plot')].find(g => g.data[0].type === 'heatmap');"
                " return g && g.layout.title.text.includes('step 0:'); }",
                timeout=RENDER_TIMEOUT_MS,
            )
            _settle(page)
            _no_exception(page)
            _shoot(page, shots / "7_attention_step0.png")

            sentence.fill("abc!")
            sentence.press("Enter")
            page.get_by_text("is not in this task's alphabet").first.wait_for(timeout=RENDER_TIMEOUT_MS)
            _no_exception(page)
            _shoot(page, shots / "8_attention_bad_text.png")

            # A modular run: the pair's heatmap, plus attention from '=' to 'a' over all (a, b).
            page.locator('[data-testid="stSelectbox"]').first.click()
            page.get_by_role("option", name="mod23", exact=True).click()
            page.wait_for_function("() => [...document.querySelectorAll('.js-plotly-plot')]"
                                   ".some(g => g.layout && (g.layout.title.text || '').includes('= → a'))",
                                   timeout=RENDER_TIMEOUT_MS)
            _settle(page)
            _no_exception(page)
            assert _heatmap(page)["x"] == ["5", "7", "="]
            _shoot(page, shots / "9_attention_modular.png")

            # A long sentence (the a_and_b run's longest): the <cls> strip with every character, and the grid.
            page.locator('[data-testid="stSelectbox"]').first.click()
            page.get_by_role("option", name="ab", exact=True).click()
            page.get_by_label("Sentence", exact=True).and_(page.locator("input")).wait_for()
            long = "x" * 30 + "a" + "y" * 17
            sentence = page.get_by_label("Sentence", exact=True).and_(page.locator("input"))
            sentence.fill(long)
            sentence.press("Enter")
            page.wait_for_function("() => [...document.querySelectorAll('.js-plotly-plot')]"
                                   ".some(g => g.layout && (g.layout.title.text || '').includes('reads'))",
                                   timeout=RENDER_TIMEOUT_MS)
            _settle(page)
            _no_exception(page)
            _shoot(page, shots / "10_attention_long.png")

            # Sweeps: clicking a cell of the phase diagram opens that cell's members' curves.
            page.goto(f"{url}/sweeps")
            page.get_by_role("heading", name="Sweeps").first.wait_for(timeout=RENDER_TIMEOUT_MS)
            _settle(page)
            find = "[...document.querySelectorAll('.js-plotly-plot')].find(g => g.layout && (g.layout.title.text || '').includes('phases over'))"
            page.evaluate(f"() => {find}.scrollIntoView({{block: 'center'}})")
            page.wait_for_timeout(500)
            cell = page.evaluate(f"""() => {{ const gd = {find}; const r = gd.getBoundingClientRect();
                const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
                return {{x: r.left + xa._offset + xa.l2p(1), y: r.top + ya._offset + ya.l2p(1)}}; }}""")
            page.mouse.move(cell["x"], cell["y"])
            page.wait_for_timeout(300)
            hover = page.locator(".hoverlayer .hovertext").first.text_content()  # an SVG element: no inner_text
            assert "model.init_scale = 2, train.weight_decay = 1" in hover and "seed0" in hover, hover
            page.mouse.click(cell["x"], cell["y"])
            page.wait_for_function(
                "() => [...document.querySelectorAll('.js-plotly-plot')].some(g => g.layout"
                " && (g.layout.title.text || '').includes('Accuracy: train')"
                " && g.data.some(t => t.name === 'init_scale2.0-weight_decay1.0-seed0 test'))",
                timeout=RENDER_TIMEOUT_MS)
            _settle(page)
            _no_exception(page)
            outline = page.evaluate(f"() => {{ const s = ({find}).layout.shapes; return s && s.length ? [s[0].x0, s[0].y0] : null; }}")
            assert outline == [0.5, 0.5], outline  # the clicked cell is outlined
            _shoot(page, shots / "12_sweeps_cell.png")
            assert not elsewhere, f"the dashboard asked other hosts: {sorted(set(elsewhere))[:5]}"
        finally:
            browser.close()
    assert len(list(shots.glob("*.png"))) == 14, sorted(p.name for p in shots.glob("*.png"))


def test_text_run_attention_in_a_browser(server, tmp_path, tmp_path_factory):
    """A word-level text run on the Attention page: an English sentence typed in, the words on both axes of
    every head's heatmap (the causal mask grey), the next-word table, and a greedy sample. The run is copied
    into the served folder for this test only (the other test counts the folder's runs)."""
    from playwright.sync_api import sync_playwright

    url, folder, _ = server
    run = shutil.copytree(dashboard_runs.shared_text_run(tmp_path_factory), folder / "hamlet")
    sentence_text = "Whether 'tis nobler in the mind to suffer the slings and arrows"
    words = ["Whether", "'tis", "nobler", "in", "the", "mind", "to", "suffer", "the", "slings", "and", "arrows"]
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport=VIEWPORT)
                page.set_default_timeout(RENDER_TIMEOUT_MS)
                page.goto(f"{url}/attention")
                page.get_by_role("heading", name="Attention").first.wait_for()
                _settle(page)
                page.locator('[data-testid="stSelectbox"]').first.click()
                page.get_by_role("option", name="hamlet", exact=True).click()
                page.get_by_label("Prompt", exact=True).wait_for()  # the text run's sampling box
                sentence = page.get_by_label("Sentence", exact=True).and_(page.locator("input"))
                sentence.fill(sentence_text)
                sentence.press("Enter")
                page.wait_for_function(
                    "words => { const g = [...document.querySelectorAll('.js-plotly-plot')].find(g => g.data[0].type === 'heatmap'"
                    " && (g.layout.title.text || '').includes('attention per head'));"
                    " return g && g.layout.xaxis.ticktext.join(' ') === words; }", arg=" ".join(words))
                _settle(page)
                _no_exception(page)
                heatmap = _heatmap(page)
                assert heatmap["x"] == words and "grey: masked" in heatmap["title"]
                assert page.evaluate("() => [...document.querySelectorAll('.js-plotly-plot')]"
                                     ".some(g => (g.layout.title.text || '').includes('likeliest next tokens'))")
                # the words as the browser drew them: the tick labels' own SVG text, not only the figure's spec
                drawn = page.evaluate("() => [...document.querySelectorAll('.js-plotly-plot .xtick text')].map(t => t.textContent)")
                assert set(words) <= set(drawn), drawn
                page.get_by_label("Prompt", exact=True).fill("To be")
                page.get_by_label("Temperature", exact=True).fill("0")
                page.get_by_label("Temperature", exact=True).press("Tab")
                page.get_by_role("button", name="Sample").click()
                page.get_by_text(", or not to be, that is the question:").first.wait_for()
                _settle(page)
                _no_exception(page)
                _shoot(page, tmp_path / "attention_words.png")
                print(f"\ntext attention screenshot: {tmp_path / 'attention_words.png'}")
            finally:
                browser.close()
    finally:
        shutil.rmtree(run, ignore_errors=True)
