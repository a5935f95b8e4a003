"""Write monitoring/laten_grafana_dashboard.json: `python monitoring/make_dashboard.py`.

The panels are laid out by Ray's own dashboard factory (the code that writes the dashboards in
a session's metrics/grafana/dashboards/), so the JSON has their schema: the `datasource`
variable, `label_values` template variables, graph panels whose targets are PromQL. Every
query is filtered by one variable: `run` (a training run's `ray_laten_*` series), `study`
(`ray_laten_study_arms`) or `application` (Ray Serve's own series of the `laten` app).
tests/test_monitoring.py runs each query against a real Prometheus.
"""
from __future__ import annotations

import json
from pathlib import Path

import ray
from ray.dashboard.modules.metrics.dashboards.common import DashboardConfig, Panel, Row, Target
from ray.dashboard.modules.metrics.grafana_dashboard_factory import _generate_grafana_panels

OUT = Path(__file__).with_name("laten_grafana_dashboard.json")

# PromQL as Ray writes it: `{{`/`}}` are literal braces, `{global_filters}` takes the
# RAY_GRAFANA_*_DASHBOARD_GLOBAL_FILTERS of a deployment (empty here).
RUN = 'run=~"$run", {global_filters}'
STUDY = 'study=~"$study", {global_filters}'
APP = 'application=~"$application", {global_filters}'


def gauge(name: str, legend: str) -> Target:
    # max over workers: a restarted actor's old series may linger for a few seconds
    return Target(expr=f"max by (run) ({name}{{{{{RUN}}}}})", legend=f"{{{{run}}}} {legend}")


def line(id_: int, title: str, description: str, unit: str, targets: list[Target]) -> Panel:
    return Panel(id=id_, title=title, description=description, unit=unit, targets=targets, fill=0, stack=False)


def latency(q: float) -> Target:
    return Target(expr=f"histogram_quantile({q}, sum by (application, le) "
                       f"(rate(ray_serve_http_request_latency_ms_bucket{{{{{APP}}}}}[$__rate_interval])))",
                  legend=f"{{{{application}}}} P{round(q * 100)}")


ROWS = [
    Row(title="Training run (laten train --ray, jobs.train)", id=100, panels=[
        line(1, "Steps", "Optimizer steps done, and the run's total.", "short", [
            gauge("ray_laten_step", "step"), gauge("ray_laten_steps_total", "of")]),
        line(2, "Losses", "LM loss and regularizer loss of the last step.", "short", [
            gauge("ray_laten_lm_loss", "LM loss"), gauge("ray_laten_reg_loss", "regularizer loss")]),
        line(3, "Step and slice wait", "The target's seconds for the last step, and how long it waited "
             "for that step's slices from the source.", "s", [
                 gauge("ray_laten_step_seconds", "step"), gauge("ray_laten_slice_wait_seconds", "slice wait")]),
        line(4, "Examples in flight", "Extract examples asked of the source and not yet trained on "
             "(at most ray.lookahead + 1).", "short", [gauge("ray_laten_examples_in_flight", "in flight")]),
        line(5, "Attribution time per role", "Seconds of attribution per second, per role (source, target): "
             "1 is one process attributing all the time.", "percentunit", [
                 Target(expr=f"sum by (run, role) (rate(ray_laten_attribution_seconds_total{{{{{RUN}}}}}"
                             "[$__rate_interval]))", legend="{{run}} {{role}}")]),
        line(6, "Slice bandwidth", "Bytes of knowledge slices the source sends per second.", "Bps", [
            Target(expr=f"sum by (run) (rate(ray_laten_slice_bytes_total{{{{{RUN}}}}}[$__rate_interval]))",
                   legend="{{run}} slices")]),
    ]),
    Row(title="Study (laten study, jobs.study)", id=200, panels=[
        Panel(id=7, title="Units by state", description="Units (arm, seed) of the study: queued, running, "
              "done, failed.", unit="short", targets=[
                  Target(expr=f"max by (study, state) (ray_laten_study_arms{{{{{STUDY}}}}})",
                         legend="{{study}} {{state}}")]),
    ]),
    Row(title="Endpoint (laten serve, jobs.serve: Ray Serve's series)", id=300, panels=[
        line(8, "Requests", "HTTP requests per second, by route and status code.", "reqps", [
            Target(expr=f"sum by (application, route, status_code) "
                        f"(rate(ray_serve_num_http_requests_total{{{{{APP}}}}}[$__rate_interval]))",
                   legend="{{application}} {{route}} {{status_code}}")]),
        line(9, "Errors", "HTTP error responses per second, by route and error code.", "reqps", [
            Target(expr=f"sum by (application, route, error_code) "
                        f"(rate(ray_serve_num_http_error_requests_total{{{{{APP}}}}}[$__rate_interval]))",
                   legend="{{application}} {{route}} {{error_code}}")]),
        line(10, "Latency", "End-to-end HTTP request latency at the proxy, P50 and P99.", "ms", [
            latency(0.5), latency(0.99)]),
        line(11, "Replicas and requests in progress", "Healthy replicas of each deployment, and the "
             "requests they are processing.", "short", [
                 Target(expr=f"sum by (application, deployment) "
                             f"(ray_serve_deployment_replica_healthy{{{{{APP}}}}})",
                        legend="{{application}} {{deployment}} healthy replicas"),
                 Target(expr=f"sum by (application, deployment) "
                             f"(ray_serve_replica_processing_queries{{{{{APP}}}}})",
                        legend="{{application}} {{deployment}} in progress")]),
    ]),
]


def variable(name: str, query: str, description: str, default: str | None = None) -> dict:
    """A template variable as Ray's dashboards write theirs (multi-select, All = .*)."""
    current = {"selected": True, "text": [default or "All"], "value": [default or "$__all"]}
    return {"name": name, "label": name, "type": "query", "description": description,
            "datasource": "${datasource}", "definition": query,
            "query": {"query": query, "refId": "StandardVariableQuery"}, "refresh": 2, "hide": 0,
            "includeAll": True, "multi": True, "allValue": ".*", "sort": 1, "current": current,
            "options": [], "regex": ""}


def dashboard() -> dict:
    config = DashboardConfig(name="LATEN", default_uid="latenDashboard", rows=ROWS, standard_global_filters=[],
                             base_json_file_name="")
    return {
        "title": "laten", "uid": config.default_uid, "version": 1, "schemaVersion": 27, "style": "dark",
        "editable": True, "graphTooltip": 1, "refresh": "10s", "time": {"from": "now-30m", "to": "now"},
        "timepicker": {}, "timezone": "", "links": [],
        "tags": ["laten", f"rayVersion:{ray.__version__}"],
        "annotations": {"list": [{"builtIn": 1, "datasource": "-- Grafana --", "enable": True, "hide": True,
                                  "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts",
                                  "type": "dashboard"}]},
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "description": "Filter queries of a specific "
             "Prometheus type.", "query": "prometheus", "refresh": 1, "hide": 2, "includeAll": False,
             "multi": False, "current": {"selected": False}, "options": [], "regex": ""},
            variable("run", "label_values(ray_laten_step, run)", "Training runs (the config's name)."),
            variable("study", "label_values(ray_laten_study_arms, study)", "Studies (the study config's name)."),
            variable("application", "label_values(ray_serve_deployment_replica_healthy, application)",
                     "Ray Serve applications (`laten serve` deploys `laten`).", default="laten"),
        ]},
        "panels": _generate_grafana_panels(config, [], ""),
    }


if __name__ == "__main__":
    OUT.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {OUT}")
