"""The web console (``/ui``) in a real browser, on a real mesh in secure mode with Zipkin.

Headless Chromium from Debian's ``chromium`` package (``/usr/bin/chromium``; ``.ci/run``
and ``./build.sh test`` install it when missing), driven by Playwright for Python, with
a fresh profile and no browser download. A screenshot of every page is saved under the
directory the first test prints (``$SLUICE_TEST_ARTIFACTS/console`` when set, else a
temporary directory). First, the last-minute figures' arithmetic on Prometheus text
as the gateway writes it (no mesh, no browser).
"""

from __future__ import annotations

import os
import re
import threading
import collections
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from manager.ui.stats import GatewayStats, Reading, window_stats
from sluice.local.mesh import LocalMesh, MeshPorts, RuntimeSpec
from sluice.local.procs import free_port
from sluice.metrics import LATENCY_BUCKETS
from tests.e2e.conftest import IRIS_CHAIN

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
LAPTOP = {"width": 1366, "height": 768}
WIDE = {"width": 2560, "height": 1200}
RECORD = {"sepal_length": 5.9, "sepal_width": 3.0, "petal_length": 5.1, "petal_width": 1.8}
#: how long the browser may take to show what the mesh already did (the box may be loaded)
UI_TIMEOUT_MS = 20_000


# --- the stats window, on Prometheus text as the gateway writes it (no mesh needed)
def gateway_text(stage_latencies_s: list[float], failed_requests: int = 0, failed_stage_calls: int = 0) -> str:
    """The gateway's series for pipeline ``p`` (one stage, model ``m``) after these calls."""
    registry = CollectorRegistry()
    requests = Counter("sluice_gateway_requests_total", "", ["pipeline", "status"], registry=registry)
    request_seconds = Histogram("sluice_gateway_request_seconds", "", ["pipeline"], buckets=LATENCY_BUCKETS, registry=registry)
    stage_seconds = Histogram("sluice_gateway_stage_seconds", "", ["pipeline", "stage", "model"], buckets=LATENCY_BUCKETS, registry=registry)
    stage_errors = Counter("sluice_gateway_stage_errors_total", "", ["pipeline", "stage", "code"], registry=registry)
    for latency in stage_latencies_s:
        requests.labels("p", "200").inc()
        request_seconds.labels("p").observe(latency)
        stage_seconds.labels("p", "0", "m").observe(latency)
    requests.labels("p", "503").inc(failed_requests)
    stage_errors.labels("p", "0", "stage_unavailable").inc(failed_stage_calls)
    return generate_latest(registry).decode()


def test_stats_are_the_difference_between_two_readings():
    base = Reading.parse(gateway_text([0.5] * 100), at=100.0)  # slow calls before the window
    now = Reading.parse(gateway_text([0.5] * 100 + [0.004] * 50, failed_requests=5, failed_stage_calls=5), at=160.0)
    out = window_stats(now, base)
    assert out.window_s == 60.0
    pipeline = out.pipelines["p"]
    assert pipeline.requests == 55 and pipeline.error_rate == round(5 / 55, 4)
    stage = pipeline.stages[0]
    assert (stage.index, stage.model, stage.requests) == (0, "m", 50)
    assert 3.0 < stage.p50_ms <= 5.0 and stage.p99_ms <= 5.0  # only the window's fast calls
    assert stage.error_rate == 0.1 and stage.rate_per_s == round(50 / 60, 3)


def test_stats_count_stage_calls_per_variant_served_in_the_window():
    def text(scikit: int, canary: int) -> str:
        registry = CollectorRegistry()
        served = Counter("sluice_gateway_stage_served_total", "", ["pipeline", "stage", "runtime", "version"], registry=registry)
        served.labels("p", "1", "scikit", "1").inc(scikit)
        served.labels("p", "1", "canary", "1").inc(canary)
        return gateway_text([0.004]) + generate_latest(registry).decode()

    out = window_stats(Reading.parse(text(90, 10), at=60.0), Reading.parse(text(40, 5), at=0.0))
    assert [(s.stage, s.runtime, s.version, s.requests) for s in out.pipelines["p"].served] == [("1", "canary", "1", 5), ("1", "scikit", "1", 50)]


def test_stats_restart_when_the_gateway_restarted():
    base = Reading.parse(gateway_text([0.004] * 100), at=0.0)
    now = Reading.parse(gateway_text([0.5] * 10), at=30.0)  # counters went down: a new gateway process
    out = window_stats(now, base)
    assert out.window_s is None and out.pipelines["p"].requests == 10 and out.pipelines["p"].p50_ms > 250


def test_stats_window_keeps_one_reading_a_window_old():
    stats = GatewayStats("http://127.0.0.1:1", window_s=60, scrape_interval_s=1, timeout_s=1)
    for at in (0.0, 30.0, 61.0, 90.0):
        stats._add(Reading(at))
    assert [r.at for r in stats._readings] == [30.0, 61.0, 90.0]
    assert stats._base(stats._readings[-1]).at == 30.0  # exactly a window before the newest
    first = GatewayStats("http://127.0.0.1:1", window_s=60, scrape_interval_s=1, timeout_s=1)
    first._add(Reading(5.0))
    assert first._base(first._readings[-1]) is None  # the first look: since the gateway started
    first._add(Reading(5.0 + 121.0))  # the next look, more than two windows later
    assert [r.at for r in first._readings] == [126.0] and first._base(first._readings[-1]) is None


#: the issue's example graph: a fan-out (scale to lr and tree) and a join (vote)
ENSEMBLE = {"name": "iris-ensemble", "stages": [
    {"id": "scale", "runtime": "scikit", "model": "iris_scaler"},
    {"id": "lr", "runtime": "scikit", "model": "iris_classifier", "after": ["scale"]},
    {"id": "tree", "runtime": "scikit", "model": "iris_tree", "after": ["scale"]},
    {"id": "vote", "runtime": "scikit", "model": "iris_vote", "after": ["lr", "tree"],
     "inputs": {"p1": "lr.probabilities", "p2": "tree.probabilities"}},
]}
#: a 50/50 split of the classifier between two runtimes serving the same model, and the
#: scaler mirrored (shadow) to the second runtime for half the calls
SPLIT = {"name": "iris-split", "stages": [
    {"runtime": "scikit", "model": "iris_scaler", "mirror": {"runtime": "scikit-b", "percent": 50}},
    {"runtime": "scikit", "model": "iris_classifier",
     "traffic": [{"runtime": "scikit", "weight": 50}, {"runtime": "scikit-b", "weight": 50}]},
]}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, model_store):
    mesh = LocalMesh(
        tmp_path_factory.mktemp("console"),
        [RuntimeSpec("scikit", "scikit", ("iris_scaler", "iris_classifier", "iris_tree", "iris_vote")),
         RuntimeSpec("scikit-b", "scikit", ("iris_scaler", "iris_classifier"))],
        MeshPorts.ephemeral(),
        zipkin_port=free_port(),
        secure=True,
    )
    with mesh:
        for definition in ({"name": "iris", "chain": IRIS_CHAIN}, ENSEMBLE, SPLIT):
            created = httpx.post(f"{mesh.manager_url}/api/v1/pipelines", json=definition, headers=mesh.admin_headers, timeout=10)
            assert created.status_code == 201, created.text
        yield mesh


@pytest.fixture(scope="module")
def tokens(mesh) -> dict[str, str]:
    return {scope: mesh.mint_token([scope])["token"] for scope in ("deploy", "serve:*")}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    root = os.environ.get("SLUICE_TEST_ARTIFACTS")
    path = Path(root) / "console" if root else tmp_path_factory.mktemp("console-screenshots")
    path.mkdir(parents=True, exist_ok=True)
    print(f"\nconsole screenshots: {path}")
    return path


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (`apt-get install -y chromium`; "
                    "`.ci/run` and `./build.sh test` do this when it is missing)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),  # a fresh user data dir
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS, viewport=LAPTOP,
        )
        try:
            yield context
        finally:
            context.close()  # Playwright stops the browser process it started


class Watched:
    """A page, and what it did that it should not: requests to other origins, script errors."""

    def __init__(self, page, origin: str):
        self.page = page
        self.foreign: list[str] = []
        self.errors: list[str] = []
        page.on("request", lambda r: None if r.url.startswith((origin, "data:")) else self.foreign.append(r.url))
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        # script errors and CSP refusals; an error status (401, 422...) the page shows is no error here
        page.on("console", lambda m: self.errors.append(m.text)
                if m.type == "error" and not m.text.startswith("Failed to load resource") else None)
        page.set_default_timeout(UI_TIMEOUT_MS)


@pytest.fixture(scope="module")
def console(browser, mesh, tokens):
    """A tab signed in with a deploy token."""
    watched = Watched(browser.new_page(), mesh.manager_url)
    page = watched.page
    page.goto(f"{mesh.manager_url}/ui")
    page.fill("#token", tokens["deploy"])
    page.click("#login button[type=submit]")
    page.wait_for_selector("#nav-actions:not([hidden])")
    yield watched
    page.close()


def show(page, route: str) -> None:
    """Open a console page in the signed-in tab: its old content is gone before the new
    one renders, so a wait for an element sees the new page's."""
    page.evaluate("""(route) => {
        document.getElementById('main').replaceChildren();
        if (location.hash === '#/' + route) window.dispatchEvent(new HashChangeEvent('hashchange'));
        else location.hash = '#/' + route;
    }""", route)


def serve(mesh: LocalMesh, pipeline: str, token: str, records: list[dict]) -> httpx.Response:
    return httpx.post(f"{mesh.gateway_url}/serve/{pipeline}", json=records, headers={"authorization": f"Bearer {token}"}, timeout=10)


def test_console_page_is_public_and_its_data_views_need_a_deploy_token(mesh, tokens, browser, artifacts):
    for path in ("/ui/", "/ui/static/js/app.js", "/ui/static/style.css"):
        assert httpx.get(f"{mesh.manager_url}{path}", timeout=5).status_code == 200, path
    no_token = httpx.get(f"{mesh.manager_url}/ui/api/stats", timeout=5)
    assert no_token.status_code == 401 and no_token.json()["error"]["code"] == "unauthorized"
    serve_only = httpx.get(f"{mesh.manager_url}/ui/api/stats", headers={"authorization": f"Bearer {tokens['serve:*']}"}, timeout=5)
    assert serve_only.status_code == 403
    # the browser asks for a token, and one without deploy shows nothing and no actions
    watched = Watched(browser.new_page(), mesh.manager_url)
    page = watched.page
    page.goto(f"{mesh.manager_url}/ui")
    page.wait_for_selector("#login")
    page.screenshot(path=artifacts / "sign-in.png")
    page.fill("#token", tokens["serve:*"])
    page.click("#login button[type=submit]")
    page.wait_for_selector("#forbidden")
    assert page.is_hidden("#nav-actions") and page.is_hidden("#nav")
    assert "serve:*" in page.inner_text("#scopes")
    page.goto(f"{mesh.manager_url}/ui/#/actions")
    page.reload()
    page.wait_for_selector("#forbidden")
    assert page.locator("#editor").count() == 0
    page.screenshot(path=artifacts / "token-without-deploy.png")
    page.close()
    assert watched.errors == [] and watched.foreign == []


def test_pipelines_page_draws_iris_with_its_stages(mesh, console, artifacts):
    page = console.page
    show(page, "pipelines")
    graph = page.wait_for_selector('svg[data-pipeline="iris"]')
    stages = graph.query_selector_all("g.node.stage")
    assert [s.get_attribute("data-model") for s in stages] == ["iris_scaler", "iris_classifier"]
    texts = [s.text_content() for s in stages]
    assert "scikit/iris_scaler" in texts[0] and "scikit · iris_scaler" in texts[0]
    assert "scikit/iris_classifier" in texts[1]
    assert len(graph.query_selector_all("g.edge")) == 3  # request -> scaler -> classifier -> response
    assert "features" in graph.query_selector_all("g.edge")[1].text_content()  # the tensor the middle arrow carries
    row = page.wait_for_selector('#pipelines-table tr[data-pipeline="iris"]')
    assert "scikit/iris_scaler → scikit/iris_classifier" in row.text_content()
    assert row.query_selector_all("td")[1].text_content() == "1"  # revision
    page.screenshot(path=artifacts / "pipelines.png", full_page=True)


def test_ensemble_is_drawn_as_its_graph_with_fan_out_and_join(mesh, console, tokens, artifacts):
    assert serve(mesh, "iris-ensemble", tokens["serve:*"], [RECORD]).status_code == 200  # the graph serves
    page = console.page
    show(page, "pipelines/iris-ensemble")
    graph = page.wait_for_selector('svg[data-pipeline="iris-ensemble"]')
    nodes = {n.get_attribute("data-stage-id"): n for n in graph.query_selector_all("g.node.stage")}
    assert sorted(nodes) == ["lr", "scale", "tree", "vote"]
    edges = sorted((e.get_attribute("data-from"), e.get_attribute("data-to")) for e in graph.query_selector_all("g.edge.stage-edge"))
    assert edges == [("lr", "vote"), ("scale", "lr"), ("scale", "tree"), ("tree", "vote")]
    io = sorted((e.get_attribute("data-from"), e.get_attribute("data-to")) for e in graph.query_selector_all("g.edge.io-edge"))
    assert io == [("request", "scale"), ("vote", "response")]
    # columns by depth: lr and tree side by side in one column, between scale and vote
    x = {k: float(re.match(r"translate\(([\d.]+),([\d.]+)\)", n.get_attribute("transform")).group(1)) for k, n in nodes.items()}
    y = {k: float(re.match(r"translate\(([\d.]+),([\d.]+)\)", n.get_attribute("transform")).group(2)) for k, n in nodes.items()}
    assert x["scale"] < x["lr"] == x["tree"] < x["vote"] and y["lr"] != y["tree"]
    assert graph.get_attribute("data-columns") == "3"
    join = graph.query_selector('g.edge.stage-edge[data-from="lr"][data-to="vote"]').text_content()
    assert "probabilities → p1" in join  # the tensor the edge carries, into the input it binds
    page.screenshot(path=artifacts / "pipeline-ensemble.png", full_page=True)
    # a per-record switch: the condition is written on its edge, the default branch is marked
    switch = {"name": "iris-switch", "stages": [
        {"id": "scale", "runtime": "scikit", "model": "iris_scaler"},
        {"id": "lr", "runtime": "scikit", "model": "iris_classifier", "after": ["scale"], "when": "scale.features[0] > 0.5"},
        {"id": "tree", "runtime": "scikit", "model": "iris_tree", "after": ["scale"], "default": True},
    ]}
    created = httpx.post(f"{mesh.manager_url}/api/v1/pipelines", json=switch, headers=mesh.admin_headers, timeout=10)
    assert created.status_code == 201, created.text
    show(page, "pipelines/iris-switch")
    graph = page.wait_for_selector('svg[data-pipeline="iris-switch"]')
    guarded = graph.query_selector('g.edge.stage-edge.conditional[data-from="scale"][data-to="lr"] text.when')
    assert "when scale.features[0] > 0.5" in guarded.text_content()
    assert graph.query_selector('g.node.stage.default[data-stage-id="tree"] text.default-mark') is not None
    assert "default" in graph.query_selector('g.edge.stage-edge[data-from="scale"][data-to="tree"]').text_content()
    page.screenshot(path=artifacts / "pipeline-switch.png", full_page=True)


def served_of(page, pipeline: str, stage: int) -> dict[str, int]:
    """Per variant of a split stage, the calls the console shows it served in the window."""
    return page.evaluate("""([pipeline, stage]) => Object.fromEntries(
        [...document.querySelectorAll(`svg[data-pipeline="${pipeline}"] g.node.stage[data-stage="${stage}"] text.variant`)]
          .map((t) => [t.dataset.runtime, Number(t.dataset.served ?? -1)]))""", [pipeline, stage])


def test_traffic_split_shows_weights_and_its_slider_replaces_the_pipeline(mesh, console, tokens, artifacts):
    page = console.page
    show(page, "pipelines/iris-split")
    graph = page.wait_for_selector('svg[data-pipeline="iris-split"]')
    variants = graph.query_selector_all('g.node.stage[data-stage="1"] text.variant')
    assert [v.get_attribute("data-runtime") for v in variants] == ["scikit", "scikit-b"]
    assert all("50%" in v.text_content() for v in variants)
    mirror = graph.query_selector('g.node.stage[data-stage="0"] g.mirror')
    assert mirror.get_attribute("data-percent") == "50" and "mirror scikit-b 50%" in mirror.text_content()
    # the served counts per variant (sluice_gateway_stage_served_total) reach the node
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: serve(mesh, "iris-split", tokens["serve:*"], [RECORD]).status_code, range(24)))
    assert answers == [200] * 24
    page.wait_for_function("""() => {
        const counts = [...document.querySelectorAll('svg[data-pipeline="iris-split"] g.node.stage[data-stage="1"] text.variant')]
          .map((t) => Number(t.dataset.served || 0));
        return counts.length === 2 && counts.every((n) => n > 0) && counts[0] + counts[1] >= 24;
    }""")
    # move the first slider to 80 (the linked second goes to 20) while four clients keep serving
    sliders = page.locator('#traffic-split .traffic-stage[data-stage="1"] input.split-slider')
    assert sliders.count() == 2
    stop, codes = threading.Event(), []

    def client():
        while not stop.is_set() and len(codes) < 2000:
            codes.append(serve(mesh, "iris-split", tokens["serve:*"], [RECORD]).status_code)

    with ThreadPoolExecutor(4) as pool:
        clients = [pool.submit(client) for _ in range(4)]
        try:
            sliders.nth(0).evaluate("(el) => { el.value = '80'; el.dispatchEvent(new Event('input')); el.dispatchEvent(new Event('change')); }")
            done = page.wait_for_selector('#traffic-split .traffic-stage[data-stage="1"] .split-result .ok-box')
        finally:
            stop.set()
            for c in clients:
                c.result()
    assert "Replaced iris-split, revision 2" in done.text_content() and "scikit-b 20" in done.text_content()
    assert codes and set(codes) == {200}, collections.Counter(codes)  # no request lost across the replace
    assert sliders.nth(1).input_value() == "20"
    stored = httpx.get(f"{mesh.manager_url}/api/v1/pipelines/iris-split", headers=mesh.admin_headers, timeout=5).json()
    assert stored["revision"] == 2
    assert [(v["runtime"], v["weight"]) for v in stored["definition"]["stages"][1]["traffic"]] == [("scikit", 80), ("scikit-b", 20)]
    # the graph is redrawn with the new revision's weights, and serving still works
    page.wait_for_selector('svg[data-pipeline="iris-split"][data-revision="2"]')
    assert "80%" in page.text_content('svg[data-pipeline="iris-split"] g.node.stage[data-stage="1"] text.variant[data-runtime="scikit"]')
    assert serve(mesh, "iris-split", tokens["serve:*"], [RECORD]).status_code == 200
    page.screenshot(path=artifacts / "pipeline-split.png", full_page=True)


def stage_calls(page, index: int) -> int:
    text = page.text_content(f'svg[data-pipeline="iris"] g.node.stage[data-stage="{index}"] .stage-errors')
    match = re.search(r"calls (\d+)", text or "")
    return int(match.group(1)) if match else -1


def test_per_stage_latency_and_errors_update_live_after_traffic(mesh, console, tokens, artifacts):
    page = console.page
    show(page, "pipelines")
    page.wait_for_selector('svg[data-pipeline="iris"] .stage-errors')
    page.wait_for_function("() => document.getElementById('live').textContent.startsWith('live figures')")
    before = stage_calls(page, 1)
    page.evaluate("window.__not_reloaded = true")
    with ThreadPoolExecutor(4) as pool:  # four concurrent clients
        answers = list(pool.map(lambda _: serve(mesh, "iris", tokens["serve:*"], [RECORD]).status_code, range(40)))
    assert answers == [200] * 40
    assert serve(mesh, "iris", tokens["serve:*"], [{"sepal_length": 1.0}]).status_code == 422  # a failed request
    # the page polls /ui/api/stats: the figures change without a reload
    page.wait_for_function(
        """(before) => {
            const node = document.querySelector('svg[data-pipeline="iris"] g.node.stage[data-stage="1"]');
            const calls = /calls (\\d+)/.exec(node.querySelector('.stage-errors').textContent);
            return calls && Number(calls[1]) >= before + 40;
        }""", arg=max(before, 0))
    assert page.evaluate("window.__not_reloaded") is True
    for index in (0, 1):
        latency = page.text_content(f'svg[data-pipeline="iris"] g.node.stage[data-stage="{index}"] .stage-latency')
        p50, p99 = (float(x) for x in re.findall(r"p\d\d ([\d.]+) ms", latency))
        assert 0 < p50 <= p99, latency
        assert "errors 0.0%" in page.text_content(f'svg[data-pipeline="iris"] g.node.stage[data-stage="{index}"] .stage-errors')
    page.wait_for_function("""() => {
        const cell = document.querySelector('#pipelines-table tr[data-pipeline="iris"] [data-figure="errors"]');
        return cell && cell.textContent !== '–' && cell.textContent !== '0.0%';
    }""")  # the pipeline's error rate counts the 422
    page.screenshot(path=artifacts / "pipelines-live.png", full_page=True)
    show(page, "pipelines/iris")
    page.wait_for_function("""() => {
        const latency = document.querySelector('svg[data-pipeline="iris"] .stage-latency');
        return latency && /p50 [\\d.]+ ms/.test(latency.textContent);
    }""")
    page.screenshot(path=artifacts / "pipeline-iris.png", full_page=True)


def test_pipeline_created_from_the_yaml_editor_is_served(mesh, console, tokens, artifacts):
    page = console.page
    show(page, "actions")
    page.wait_for_selector("#editor")
    page.fill("#editor", "name: iris-console\ntransportType: http\nchain:\n  - scikit/iris_scaler\n  - scikit/iris_classifier\n")
    page.wait_for_selector('.stage-card[data-stage="1"]')  # the preview read the YAML (through /ui/api/yaml)
    page.click("#submit")
    assert "Created iris-console, revision 1" in page.wait_for_selector("#deployed").text_content()
    answer = serve(mesh, "iris-console", tokens["serve:*"], [RECORD])
    assert answer.status_code == 200, answer.text
    assert answer.json()[0]["label"] in ("setosa", "versicolor", "virginica")
    page.screenshot(path=artifacts / "actions-created.png", full_page=True)


def test_bad_definition_error_is_placed_at_its_stage_and_tensor(mesh, console, artifacts):
    page = console.page
    show(page, "actions")
    page.wait_for_selector("#editor")
    page.fill("#editor", """{"name": "iris-bad", "stages": [
      {"runtime": "scikit", "model": "iris_scaler"},
      {"runtime": "scikit", "model": "iris_classifier", "inputs": {"features": "no_such_output"}}]}""")
    page.wait_for_selector('.stage-card[data-stage="1"]')
    # a dry run (Validate: the bulk apply's 422 lists problems) and a create (the pipeline's own 422)
    for button, code in (("#validate", "422 invalid_apply"), ("#submit", "422 signature_mismatch")):
        page.click(button)
        page.wait_for_function("(code) => document.getElementById('result').textContent.startsWith(code)", arg=code)
        card = page.wait_for_selector('.stage-card[data-stage="1"].has-error')
        assert "no_such_output" in card.query_selector(".stage-error").text_content()
        assert card.query_selector('.tensor.named[data-tensor="features"]') is not None
        assert page.query_selector('.stage-card[data-stage="0"].has-error') is None
    page.screenshot(path=artifacts / "actions-error.png", full_page=True)
    assert httpx.get(f"{mesh.manager_url}/api/v1/pipelines/iris-bad", headers=mesh.admin_headers, timeout=5).status_code == 404


def test_runtimes_and_models_pages_show_health_versions_signatures_and_use(mesh, console, artifacts):
    page = console.page
    show(page, "runtimes")
    card = page.wait_for_selector('.runtime-card[data-runtime="scikit"]')
    assert card.query_selector('tr.instance[data-healthy="true"]') is not None
    assert "1 healthy" in card.text_content()
    scaler = card.query_selector('tr[data-model="iris_scaler"]').text_content()
    assert "iris stage 0" in scaler and "sepal_length: FP64[-1]" in scaler
    page.screenshot(path=artifacts / "runtimes.png", full_page=True)

    show(page, "models")
    model = page.wait_for_selector('.model-card[data-model="iris_classifier"]')
    version = model.query_selector('tr[data-version="1"]').text_content()
    assert "features: FP64[-1,4]" in version and "probabilities: FP64[-1,3]" in version and "scikit (1)" in version
    page.screenshot(path=artifacts / "models.png", full_page=True)


def test_traces_page_links_each_request_to_zipkin(mesh, console, tokens, artifacts):
    assert serve(mesh, "iris", tokens["serve:*"], [RECORD]).status_code == 200
    page = console.page
    show(page, "traces/iris")
    # a whole trace (both stages' spans, which run fused in one call, sluice.fusion: Envoy
    # flushes its spans every 5 s, the page refreshes every 5 s)
    handle = page.wait_for_function("""() => {
        for (const row of document.querySelectorAll('#traces-table tr.trace')) {
            const text = row.nextElementSibling.textContent;
            if (text.includes('infer iris_classifier') && text.includes('stages 0+1')) return row.dataset.trace;
        }
        return null;
    }""", timeout=40_000)
    trace_id = handle.json_value()
    link = page.wait_for_selector(f'tr.trace[data-trace="{trace_id}"] a.trace-link')
    href = link.get_attribute("href")
    assert link.text_content() == trace_id and href == f"{mesh.zipkin_url}/zipkin/traces/{trace_id}"
    # bounded, not tight: Zipkin's JVM serves its UI's first page slowly on a loaded box
    assert httpx.get(f"{mesh.zipkin_url}/api/v2/trace/{trace_id}", timeout=30).status_code == 200
    assert httpx.get(href, timeout=30).status_code == 200  # Zipkin's own trace view
    page.click(f'tr.trace[data-trace="{trace_id}"] .toggle-spans')
    waterfall = page.wait_for_selector(f'tr.trace[data-trace="{trace_id}"] + tr .waterfall')
    assert waterfall.is_visible()
    labels = [label.text_content() for label in waterfall.query_selector_all(".label")]
    assert any("stages 0+1 iris_scaler+iris_classifier" in label for label in labels)  # the gateway's one call
    assert any("infer iris_scaler" in label for label in labels) and any("infer iris_classifier" in label for label in labels)
    # the front Envoy, the gateway, its call, egress, the runtime's sidecar, its call and each stage's span
    assert len(waterfall.query_selector_all(".bar")) == len(labels) >= 8
    page.screenshot(path=artifacts / "traces.png", full_page=True)


def test_delete_asks_for_confirmation(mesh, console, tokens, artifacts):
    page = console.page
    show(page, "actions")
    page.wait_for_selector('#delete-pipeline option[value="iris-console"]', state="attached")
    page.select_option("#delete-pipeline", "iris-console")
    page.click("#delete")
    page.wait_for_selector("#confirm-delete[open]")
    page.screenshot(path=artifacts / "actions-delete-confirm.png")
    page.click('#confirm-delete button[value="cancel"]')
    page.wait_for_selector("#confirm-delete:not([open])", state="attached")
    assert httpx.get(f"{mesh.manager_url}/api/v1/pipelines/iris-console", headers=mesh.admin_headers, timeout=5).status_code == 200
    page.click("#delete")
    page.click("#confirm-delete-button")
    page.wait_for_selector("text=Deleted iris-console.")
    assert httpx.get(f"{mesh.manager_url}/api/v1/pipelines/iris-console", headers=mesh.admin_headers, timeout=5).status_code == 404
    assert serve(mesh, "iris-console", tokens["serve:*"], [RECORD]).status_code == 404
    # the actions page lists the sliders of every split stage (iris-split's classifier)
    assert page.is_visible('#traffic-split .traffic-controls[data-pipeline="iris-split"] .traffic-stage[data-stage="1"] input.split-slider')


def test_console_fits_laptop_and_wide_screens_and_fetches_nothing_from_outside(mesh, console, artifacts):
    page = console.page
    for name, viewport in (("laptop", LAPTOP), ("wide", WIDE)):
        page.set_viewport_size(viewport)
        for route, shown in (("pipelines", 'svg[data-pipeline="iris"]'), ("runtimes", ".runtime-card"), ("models", ".model-card"), ("actions", ".stage-card")):
            show(page, route)
            page.wait_for_selector(shown)
            # no sideways scrolling of the page itself (a long graph scrolls inside its box)
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), (name, route)
        show(page, "pipelines")
        page.wait_for_selector('svg[data-pipeline="iris"]')
        page.screenshot(path=artifacts / f"pipelines-{name}.png", full_page=True)
    page.set_viewport_size(LAPTOP)
    assert console.foreign == [], console.foreign
    assert console.errors == [], console.errors


@pytest.fixture
def dev_mesh(tmp_path, model_store):
    """Dev mode (what plain ``sluice up`` starts): no tokens, no Zipkin."""
    mesh = LocalMesh(tmp_path / "dev", [RuntimeSpec("scikit", "scikit", ("iris_scaler", "iris_classifier"))], MeshPorts.ephemeral())
    with mesh:
        yield mesh


def test_dev_mode_console_needs_no_token_and_says_tracing_is_off(dev_mesh, browser, artifacts):
    watched = Watched(browser.new_page(), dev_mesh.manager_url)
    page = watched.page
    page.goto(f"{dev_mesh.manager_url}/ui/#/pipelines")
    page.wait_for_selector("#no-pipelines")  # straight in: no sign-in form
    assert page.locator("#login").count() == 0 and page.is_visible("#nav-actions")
    assert "dev mode" in page.inner_text("#who")
    show(page, "traces")
    assert "Tracing is off" in page.wait_for_selector(".note").text_content()
    show(page, "actions")
    page.wait_for_selector('.stage-card[data-stage="0"]')
    page.screenshot(path=artifacts / "dev-mode-actions.png", full_page=True)
    page.close()
    assert watched.errors == [] and watched.foreign == []
