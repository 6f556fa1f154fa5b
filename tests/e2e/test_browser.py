"""The state page and the Flink web UI of a running job, as a user sees them in headless Chromium;
and the state page showing names that look like markup as plain text."""
from __future__ import annotations

import json

import pytest

from browser import Browser, require_chromium, screenshot_path
from modelserving.state.service import StateService
from protos import ModelStats, ModelType, ServingResult

pytestmark = pytest.mark.e2e

# The keyed job: there a data type lives on one subtask, whose metric is the whole usage.
JOB_MODULES = ["jobs.keyed_job"]

DATA_TYPE = "browser-type"
SERVING_OPERATOR = "serve models (keyed by data type)"


def scored(serving, model_name: str) -> list[ServingResult]:
    with serving.collector.lock:
        return [r for r in serving.collector.results if r.status == ServingResult.SCORED
                and r.dataType == DATA_TYPE and r.modelName == model_name]


@pytest.fixture(scope="session")
def chromium() -> str:
    """Chromium, looked for before any broker or job starts (the test skips without it)."""
    return require_chromium()


HOSTILE_TYPE = "<script>window.__injected = 'data type'</script>"
HOSTILE_MODEL = '<img src=x onerror="window.__injected = \'model\'">'
HOSTILE_JOB = '"><b id="injected">job</b>'


def test_state_page_shows_markup_in_names_as_text(chromium):
    """Data types, model and job names are whatever was written to the state topic: the page
    must show them as text, never run or render them. No broker needed: the view is fed here."""
    service = StateService(port=0).start()
    try:
        service.view.ingest(f"keyed/{HOSTILE_TYPE}", ModelStats(
            job="keyed", dataType=HOSTILE_TYPE, part=-1, hasModel=True, modelName=HOSTILE_MODEL,
            modelVersion="1", modelType=ModelType.ONNX, modelId="m1", sinceMs=1_700_000_000_000,
            usage=3, totalMicros=3000.0, publishedMs=1_700_000_001_000).SerializeToString())
        service.view.ingest(f"{HOSTILE_JOB}/{HOSTILE_TYPE}", ModelStats(
            job=HOSTILE_JOB, dataType=HOSTILE_TYPE, part=-1, hasModel=False, noModel=4,
            publishedMs=1_700_000_001_000).SerializeToString())
        with Browser.launch(chromium) as browser:
            page = browser.new_page(1400, 900)
            page.goto(service.url + "/?refresh=0.5")
            rows = page.wait_for("""(() => {
                const rows = [...document.querySelectorAll("tr[data-job]")];
                return rows.length === 2 ? rows.map(r => [r.getAttribute("data-type"),
                    r.getAttribute("data-job"), r.querySelector("td.model-name").textContent]) : null;
            })()""", 30, "both rows of the hostile data type")
            assert sorted(rows) == sorted([[HOSTILE_TYPE, HOSTILE_JOB, "(no model)"],
                                           [HOSTILE_TYPE, "keyed", HOSTILE_MODEL]])
            assert page.evaluate("document.querySelector('section.data-type h2').textContent") == HOSTILE_TYPE
            page.click("details.history summary")
            entry = page.wait_for("(document.querySelector('details[open] li.history-entry') || {}).textContent",
                                  10, "the open history")
            assert entry.startswith(f"keyed: {HOSTILE_MODEL} v1 (ONNX)")
            text = page.text()
            assert HOSTILE_TYPE in text and HOSTILE_MODEL in text and HOSTILE_JOB in text
            # nothing was interpreted: one script (the page's own), no image, no injected element
            assert page.evaluate("""[document.scripts.length, document.images.length,
                                     !!document.getElementById("injected"),
                                     window.__injected === undefined]""") == [1, 0, False, True]
            assert page.errors() == []
            print(f"\nstate page with hostile names: {page.screenshot(screenshot_path('state-page-hostile-names'))}")
    finally:
        service.stop()


def test_state_page_lists_the_repository_versions_as_text(chromium):
    """The page's repository section: per data type its versions with created, deployed and
    retired times (UTC to the second, as the CLI's tables) and outcome, names shown as text.
    No broker: the view is fed here."""
    import hashlib

    from modelserving.cli.models import when
    from modelserving.state.repository import RepositoryView
    from protos import ModelDescriptor
    from udfs.lifecycle import repository
    from udfs.lifecycle.repository import ACCEPTED, VALIDATION_FAILED

    t0 = 1_700_000_000_000
    entries = [repository.entry_from_descriptor(
        ModelDescriptor(name=HOSTILE_MODEL, version=v, dataType=HOSTILE_TYPE,
                        modeltype=ModelType.ONNX, data=v.encode(), publishedMs=t0 + int(v)),
        digest=hashlib.sha256(v.encode()).hexdigest()) for v in "123"]
    first = repository.record_deployment(entries[0], "keyed", ACCEPTED, t0 + 1000)
    reason = "validation failed on 45 rows: accuracy 0.6000 < minimum 0.9 (27/45 labels)"
    view = RepositoryView()
    for record in (first, repository.record_retirement(first, "keyed", t0 + 2000, "2"),
                   repository.record_deployment(entries[1], "keyed", ACCEPTED, t0 + 2000),
                   repository.record_deployment(entries[2], "keyed", VALIDATION_FAILED,
                                                t0 + 3000, reason=reason)):
        view.ingest(None, record.SerializeToString())
    service = StateService(port=0, repository=view).start()
    try:
        with Browser.launch(chromium) as browser:
            page = browser.new_page(1400, 1200)   # the timeline above the repository too
            page.goto(service.url + "/?refresh=0.5")
            rows = page.wait_for("""(() => {
                const rows = [...document.querySelectorAll("table.repository tr.repository-entry")];
                return rows.length === 3 ? rows.map(r => ["version", "name", "digest", "created",
                    "outcome", "deployed", "retired", "note"].map(c =>
                    r.querySelector("td." + c).textContent)) : null;
            })()""", 30, "the three versions of the repository")
            assert rows == [
                ["1", HOSTILE_MODEL, hashlib.sha256(b"1").hexdigest()[:12], when(t0 + 1), "RETIRED",
                 when(t0 + 1000), when(t0 + 2000), "replaced by 2"],
                ["2", HOSTILE_MODEL, hashlib.sha256(b"2").hexdigest()[:12], when(t0 + 2), "SERVING",
                 when(t0 + 2000), "", ""],
                ["3", HOSTILE_MODEL, hashlib.sha256(b"3").hexdigest()[:12], when(t0 + 3),
                 "VALIDATION_FAILED", when(t0 + 3000), "", reason]]
            assert page.evaluate("document.querySelector('section.repository h3').textContent") \
                == HOSTILE_TYPE
            assert page.evaluate("""[document.scripts.length, document.images.length,
                                     window.__injected === undefined]""") == [1, 0, True]
            assert page.errors() == []
            print(f"\nstate page, repository: "
                  f"{page.screenshot(screenshot_path('state-page-repository'))}")
    finally:
        service.stop()


TIMELINE_TYPE = "wine-cultivar"
TIMELINE_MODEL = "wine-<b>logreg</b>"


def timeline_repository():
    """keyed's lifecycle of TIMELINE_TYPE, as the jobs record it (field by field): v1 the
    model from +1 s until v2 replaced it at +30 s; v2 a 10% canary from +10 s, promoted at +30 s
    (and from then the model); v3 a shadow from +40 s, replaced by the candidate v4 at +50 s;
    v4 a 10% canary since."""
    from modelserving.state.repository import RepositoryView
    from protos import RepositoryEntry

    t0 = 1_700_000_000_000
    plan = {"1": [("", 1000, 30_000, "2")],
            "2": [("canary 10%", 10_000, 30_000, "promoted"), ("", 30_000, 0, "")],
            "3": [("shadow", 40_000, 50_000, "4")],
            "4": [("canary 10%", 50_000, 0, "")]}
    view = RepositoryView()
    for version, deployments in plan.items():
        entry = RepositoryEntry(dataType=TIMELINE_TYPE, name=TIMELINE_MODEL, version=version,
                                modelType=ModelType.ONNX, digest=version * 64,
                                createdMs=t0 + int(version), publishedMs=t0 + int(version),
                                descriptorId=f"descriptor-{version}")
        for role, deployed, retired, by in deployments:
            entry.deployments.add(job="keyed", outcome=RepositoryEntry.ACCEPTED, role=role,
                                  deployedMs=t0 + deployed, retiredMs=t0 + retired if retired else 0,
                                  retiredBy=by)
        view.ingest(None, entry.SerializeToString())
    return view


def timeline_statistics(service) -> None:
    """What keyed published: v1 scored 5,000 records; v2 8,966 since, drifting on alcohol,
    with v4 as its 10% canary (1,234 records, 1,201 of them agreeing with v2)."""
    from protos import CandidateStats, FeatureDrift, Rollout

    t0 = 1_700_000_000_000
    common = dict(job="keyed", dataType=TIMELINE_TYPE, part=-1, hasModel=True,
                  modelName=TIMELINE_MODEL, modelType=ModelType.ONNX)
    service.view.ingest(f"keyed/{TIMELINE_TYPE}", ModelStats(
        **common, modelVersion="1", modelId="descriptor-1", sinceMs=t0 + 1000, usage=5000,
        totalMicros=5_000_000.0, minMicros=380.0, maxMicros=2900.0, publishedMs=t0 + 29_000).SerializeToString())
    current = ModelStats(**common, modelVersion="2", modelId="descriptor-2-promoted",
                         sinceMs=t0 + 30_000, usage=8966, totalMicros=8_966_000.0,
                         minMicros=410.0, maxMicros=3100.0,
                         publishedMs=t0 + 90_000, outputPsi=0.12, driftFlagged=True,
                         driftThreshold=0.2, driftRows=600)
    current.drift.extend([FeatureDrift(feature="alcohol", psi=0.412, flagged=True),
                          FeatureDrift(feature="ash", psi=0.05)])
    current.candidate.CopyFrom(CandidateStats(
        modelName=TIMELINE_MODEL, modelVersion="4", descriptorId="descriptor-4",
        mode=Rollout.CANARY, share=0.1, sinceMs=t0 + 50_000, records=1234, compared=1234,
        agreed=1201, differenceSum=14.808, absDifferenceSum=20.0, primaryRecords=8966))
    service.view.ingest(f"keyed/{TIMELINE_TYPE}", current.SerializeToString())


def test_state_page_shows_the_candidate_and_the_lifecycle_timeline(chromium):
    """The page's candidate line under the job's row, and the timeline of the data type: every
    deployment in time order (primary, canary, shadow) with when it ended and why, its usage
    where known, the candidate's figures and the serving model's drift. Names as text. No
    broker: the statistics view and the repository are fed here."""
    from modelserving.cli.models import when

    t0 = 1_700_000_000_000

    def utc(ms: int) -> str:    # the timeline's times: UTC to the second, as the CLI's tables
        return when(t0 + ms)

    service = StateService(port=0, repository=timeline_repository()).start()
    try:
        timeline_statistics(service)
        figures = ("canary 10% · 1,234 records (12.1% of 10,200) · agreement 97.3% over 1,234 · "
                   "mean score difference +0.0120")
        with Browser.launch(chromium) as browser:
            page = browser.new_page(1400, 900)
            page.goto(service.url + "/?refresh=0.5")
            rows = page.wait_for("""(() => {
                const rows = [...document.querySelectorAll("table.timeline tr.timeline-event")];
                return rows.length === 5 ? rows.map(r => ["deployed", "version", "name", "job",
                    "role", "status", "retired", "ended", "usage", "figures"].map(c =>
                    r.querySelector("td." + c).textContent)) : null;
            })()""", 30, "the five deployments of the timeline")
            assert rows == [
                [utc(1000), "1", TIMELINE_MODEL, "keyed", "primary", "RETIRED",
                 utc(30_000), "replaced by 2", "5,000", ""],
                [utc(10_000), "2", TIMELINE_MODEL, "keyed", "canary 10%", "RETIRED",
                 utc(30_000), "promoted", "", ""],
                [utc(30_000), "2", TIMELINE_MODEL, "keyed", "primary", "SERVING", "", "",
                 "8,966", "DRIFT · PSI max 0.412 (alcohol) · 600 records"],
                [utc(40_000), "3", TIMELINE_MODEL, "keyed", "shadow", "RETIRED",
                 utc(50_000), "replaced by 4", "", ""],
                [utc(50_000), "4", TIMELINE_MODEL, "keyed", "canary 10%", "CANDIDATE", "",
                 "", "1,234", figures]]
            candidate = page.evaluate(
                "[...document.querySelectorAll('tr.candidate td')].map(td => td.textContent)")
            assert candidate == [f"candidate {TIMELINE_MODEL} v4 · {figures}"]
            assert page.evaluate("""[document.querySelector('section.timeline h3').textContent,
                document.querySelector('tr.timeline-event[data-status="SERVING"] td.figures')
                    .getAttribute('data-drift-flagged')]""") == [TIMELINE_TYPE, "true"]
            # the names' markup is text: no <b> element, no image, only the page's own script
            assert page.evaluate("""[document.scripts.length, document.images.length,
                                     document.querySelectorAll('b').length]""") == [1, 0, 0]
            assert page.errors() == []
            print(f"\nstate page, candidate and timeline: "
                  f"{page.screenshot(screenshot_path('state-page-timeline'))}")
    finally:
        service.stop()


def pick_metric(page, metric: str, attempts: int = 3) -> bool:
    """Open the "Add Metric" list, filter it and pick ``metric``; False if the web UI would
    not let us (seen on a loaded 2-core machine: the list does not open or take the focus).
    Typing goes to whatever has the focus, so the search box is focused explicitly."""
    selector = "flink-job-overview-drawer-chart nz-select"
    for _ in range(attempts):
        try:
            page.click(f"{selector} .ant-select-selector", timeout_s=30)
            page.evaluate(f"document.querySelector({json.dumps(selector + ' input')}).focus()")
            page.wait_for("(() => { const a = document.activeElement; "
                          "return a && a.tagName === 'INPUT' && !!a.closest('nz-select'); })()",
                          10, "the metric list's search box to have the focus")
            page.evaluate("document.activeElement.select()")  # replaces an earlier attempt's text
            page.type_text(metric.split(".datatype.", 1)[1])
            page.click(".ant-select-item-option", metric, timeout_s=20)
            return True
        except TimeoutError as exc:
            print(f"picking {metric} in the web UI failed, trying again: {str(exc)[:120]}")
            page.call("Input.dispatchKeyEvent", {"type": "keyDown", "key": "Escape"})
    return False


def test_state_page_and_flink_web_ui_show_the_model_and_its_metric(chromium, serving):
    """Publish a model, score records, then look at both pages in headless Chromium.

    The state page must show the model and a usage equal to the records it scored (counted
    on the results topic), and list it under "recent models". The Flink web UI's page of the
    running job must show the job's name, its state and the serving operator.

    The per-model metric is shown by driving the web UI as a user would, not by reading the
    REST API: the serving vertex's Metrics tab, "Add Metric", type the data type's
    ``records_scored``, pick the entry of the subtask that owns the data type, switch the
    card to Big and Numeric, and the number shown must equal the same count. The browser is
    driven over the DevTools protocol (real mouse and keyboard events) and every step waits
    for the element it needs, so this proved reliable and quick; the REST API only gives
    the vertex id for the tab's address.

    The keyed job is enough: there a data type lives on one subtask, whose metric is the
    whole usage (the broadcast job spreads a data type's records over its instances).
    Screenshots of the three views go to artifacts/screenshots/.
    """
    model = serving.models[ModelType.ONNX]
    process = serving.process
    service = StateService(serving.settings, port=0).start()
    try:
        service.wait_ready(60)
        rows = serving.publish_and_score(model, DATA_TYPE, "browser", 30)
        results = scored(serving, model.name)
        usage = len(results)
        subtasks = {r.subtask for r in results}
        assert usage >= len(rows) and len(subtasks) == 1, subtasks  # keyed: one owner subtask

        with Browser.launch(chromium) as browser:
            page = browser.new_page(1400, 900)

            # -- the state page (it refreshes itself until the published usage catches up)
            page.goto(service.url + "/?refresh=1")
            row = f'tr[data-type="{DATA_TYPE}"][data-job="{serving.settings.job_name}"]'
            shown = page.wait_for(f"""(() => {{
                const row = document.querySelector({json.dumps(row)});
                if (!row) return null;
                const cell = c => row.querySelector("td." + c).innerText.trim();
                const shown = {{name: cell("model-name"), usage: cell("usage"), type: cell("model-type")}};
                return shown.usage === "{usage}" ? shown : null;
            }})()""", 60, f"the state page to show usage {usage} for {DATA_TYPE}")
            assert shown == {"name": model.name, "usage": str(usage), "type": "ONNX"}
            text = page.text()
            assert DATA_TYPE in text and model.name in text
            page.click(f'details.history[data-type="{DATA_TYPE}"] summary')   # recent models
            page.wait_for(f"[...document.querySelectorAll('details[open] li.history-entry')]"
                          f".some(li => li.innerText.includes({json.dumps(model.name)}))",
                          10, "the model in the open history")
            state_png = page.screenshot(screenshot_path("state-page"))
            print(f"\nstate page: {state_png}")

            # -- the Flink web UI: the running job's page
            web_ui = f"http://127.0.0.1:{process.settings.rest_port}"
            page.goto(f"{web_ui}/#/job/running/{process.job_id}/overview")
            page.wait_for(f"""(() => {{
                // the job graph drawn (its position settled) and the vertex list filled in
                const nodes = [...document.querySelectorAll("flink-dagre .node-group")];
                const node = nodes.find(n => n.textContent.includes({json.dumps(SERVING_OPERATOR)}));
                const rows = document.querySelectorAll("flink-job-overview-list tbody tr");
                if (nodes.length < 3 || !node || rows.length < 3
                    || document.body.innerText.includes("loading...")) return false;
                const r = node.getBoundingClientRect();
                const where = [r.x, r.y, r.width, r.height].map(Math.round).join();
                const settled = r.width > 0 && window.__servingNodeAt === where;
                window.__servingNodeAt = where;
                return settled;
            }})()""", 60, "the job page with its graph and vertices")
            text = page.text()
            assert serving.settings.job_name in text and "RUNNING" in text
            assert SERVING_OPERATOR in text
            job_png = page.screenshot(screenshot_path("flink-job-overview"))
            print(f"Flink web UI, job page: {job_png}")

            # -- its serving vertex, Metrics tab: add the data type's records_scored
            vertex = next(v["id"] for v in process.rest(f"/jobs/{process.job_id}")["vertices"]
                          if v["name"].startswith(SERVING_OPERATOR))
            metric = (f"{subtasks.pop()}.serve_models_(keyed_by_data_type)"
                      f".modelserving.datatype.{DATA_TYPE}.records_scored")
            # the tab lists the vertex's metrics once, when it opens; Python metrics reach the
            # REST API with some delay, so open it once the metric exists there
            listed = f"/jobs/{process.job_id}/vertices/{vertex}/metrics"
            serving.collector.wait_for(lambda _: any(m["id"] == metric for m in process.rest(listed) or []),
                                       60, f"{metric} in the REST API")
            page.goto(f"{web_ui}/#/job/running/{process.job_id}/overview/{vertex}/metrics")
            if not pick_metric(page, metric):
                # Fallback, said in the output: the same value as the web UI's REST API serves
                # it to the browser, so the check of the value stays.
                print(f"the web UI's metric list would not open; reading {metric} from the REST page")
                page.goto(f"{web_ui}/jobs/{process.job_id}/vertices/{vertex}/subtasks/"
                          f"{metric.split('.', 1)[0]}/metrics?get={metric.split('.', 1)[1]}")
                page.wait_for(f"document.body.innerText.includes('\"value\":\"{usage}\"')", 60,
                              f"{metric} = {usage} on the REST page")
                rest_png = page.screenshot(screenshot_path("flink-vertex-metrics"))
                print(f"Flink REST, serving vertex metric {metric} = {usage}: {rest_png}")
                return
            chart = f"flink-job-chart:has(.title .text[title={json.dumps(metric)}])"
            page.click(f"{chart} .title button", "Big")
            page.click(f"{chart} .type-switch button", "Numeric")
            value = page.wait_for(f"""(() => {{
                const numeric = document.querySelector({json.dumps(chart + " .numeric")});
                const value = numeric && !numeric.hidden ? numeric.innerText.trim() : null;
                return value === "{usage}" ? value : null;
            }})()""", 60, f"{metric} = {usage} in the web UI")
            assert value == str(usage)
            page.wait_for("!document.querySelector('.ant-select-dropdown')", 10,
                          "the metric list to close")
            assert SERVING_OPERATOR in page.text()
            metric_png = page.screenshot(screenshot_path("flink-vertex-metrics"))
            print(f"Flink web UI, serving vertex metric {metric} = {value}: {metric_png}")
    finally:
        service.stop()
