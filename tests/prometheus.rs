//! The alert rules (`deploy/prometheus/rules.yaml`, also as a
//! `PrometheusRule` in `deploy/k8s/`) and the Grafana dashboard
//! (`deploy/grafana/kling-archiver.json`) against the real thing:
//!
//! - `promtool check rules` and `promtool test rules` (every alert fires on
//!   a series that should wake someone and stays silent on a healthy one);
//! - every alert's runbook link lands on a section of docs/operations.md;
//! - a real Prometheus on loopback scrapes the real `worker` binary running
//!   a batch against the simulator, and RabbitMQ's own rabbitmq_prometheus
//!   plugin; every panel's and every rule's PromQL then goes through its HTTP
//!   API, and `promtool check metrics` reads the worker's real `/metrics`.
//!
//! Debian's `prometheus` package brings both binaries; `tests/run.sh`
//! installs it and enables the RabbitMQ plugin. A missing one fails.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Backend, TestEnv, b64, free_port, jpeg};
use serde_yaml_ng::Value;

const RULES: &str = "deploy/prometheus/rules.yaml";
const RULE_TESTS: &str = "deploy/prometheus/rules.test.yaml";
const OPERATOR_RULE: &str = "deploy/k8s/prometheus-rule.yaml";
const DASHBOARD: &str = "deploy/grafana/kling-archiver.json";
/// Where the rabbitmq_prometheus plugin serves per-queue series.
const RABBITMQ_METRICS: &str = "127.0.0.1:15692";
/// The queue the rules are written for (`WORKER_QUEUE`'s default).
const RULES_QUEUE: &str = "kling.jobs";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn yaml(rel: &str) -> Value {
    serde_yaml_ng::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// `promtool` or `prometheus`, which must be installed (never skipped).
fn tool(name: &str) -> Command {
    let found = Command::new(name)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{name} is not installed: Debian's `prometheus` package brings it \
         (`apt-get install -y prometheus`; tests/run.sh installs it)"
    );
    let mut cmd = Command::new(name);
    cmd.current_dir(root());
    cmd
}

fn run(mut cmd: Command) -> String {
    let out = cmd.output().expect("run");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// One alerting rule of rules.yaml.
struct Alert {
    name: String,
    expr: String,
    labels: Value,
    annotations: Value,
}

fn alerts() -> Vec<Alert> {
    let rules = yaml(RULES);
    let mut out = Vec::new();
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            out.push(Alert {
                name: rule["alert"].as_str().expect("only alerting rules").into(),
                expr: rule["expr"].as_str().expect("expr").into(),
                labels: rule["labels"].clone(),
                annotations: rule["annotations"].clone(),
            });
        }
    }
    out
}

/// One query of the dashboard: (panel title, refId, PromQL).
fn panel_queries() -> Vec<(String, String, String)> {
    let dash: serde_json::Value = serde_json::from_str(&read(DASHBOARD)).expect("JSON");
    let mut out = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().expect("targets") {
            out.push((
                p["title"].as_str().expect("title").into(),
                t["refId"].as_str().expect("refId").into(),
                t["expr"].as_str().expect("expr").into(),
            ));
        }
    }
    out
}

/// The metric names a PromQL expression reads.
fn metric_names(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("kling_archiver_") || w.starts_with("rabbitmq_"))
        .map(str::to_owned)
        .collect()
}

/// GitHub's anchors for the headings of a Markdown page.
fn anchors(markdown: &str) -> BTreeSet<String> {
    markdown
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .map(|h| {
            h.trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                    _ => None,
                })
                .collect()
        })
        .collect()
}

#[test]
fn promtool_checks_the_rules_and_their_unit_tests_pass() {
    let mut check = tool("promtool");
    check.args(["check", "rules", RULES]);
    eprintln!("{}", run(check));
    let mut test = tool("promtool");
    test.args(["test", "rules", RULE_TESTS]);
    eprintln!("{}", run(test));
}

#[test]
fn every_alert_has_a_unit_test_that_fires_and_one_that_stays_silent() {
    let tests = yaml(RULE_TESTS);
    let mut fires: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut silent: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for t in tests["tests"].as_sequence().expect("tests") {
        let name = t["name"].as_str().expect("every case is named").to_owned();
        for a in t["alert_rule_test"].as_sequence().expect("alert_rule_test") {
            let alert = a["alertname"].as_str().expect("alertname").to_owned();
            let expected = a["exp_alerts"].as_sequence().map_or(0, Vec::len);
            let side = if expected > 0 {
                &mut fires
            } else {
                &mut silent
            };
            side.entry(alert).or_default().push(name.clone());
        }
    }
    for a in alerts() {
        let f = fires.get(&a.name);
        let s = silent.get(&a.name);
        assert!(f.is_some(), "no promtool case fires {}", a.name);
        assert!(s.is_some(), "no promtool case keeps {} silent", a.name);
        eprintln!(
            "{}\n  fires: {:?}\n  silent: {:?}",
            a.name,
            f.unwrap(),
            s.unwrap()
        );
    }
}

#[test]
fn every_alert_says_what_and_how_bad_and_links_its_runbook_section() {
    let ops = anchors(&read("docs/operations.md"));
    let all = alerts();
    assert!(all.len() >= 8, "{} alerts", all.len());
    for a in &all {
        for key in ["summary", "description", "runbook_url"] {
            assert!(
                a.annotations[key].as_str().is_some_and(|s| !s.is_empty()),
                "{}: no {key}",
                a.name
            );
        }
        let severity = a.labels["severity"].as_str().unwrap_or_default();
        assert!(
            ["critical", "warning"].contains(&severity),
            "{}: severity {severity:?}",
            a.name
        );
        let url = a.annotations["runbook_url"].as_str().unwrap();
        let (page, anchor) = url.split_once('#').expect("runbook_url has a #section");
        assert!(page.ends_with("/docs/operations.md"), "{url}");
        assert!(
            ops.contains(anchor),
            "{}: docs/operations.md has no section #{anchor}",
            a.name
        );
        assert_eq!(anchor, a.name.to_lowercase(), "one section per alert");
    }
    let account = all
        .iter()
        .find(|a| a.expr.contains(r#"cause="account""#))
        .expect("an alert on account suspension");
    assert_eq!(account.labels["severity"], "critical", "it pages");
}

#[test]
fn the_prometheus_operator_rule_carries_the_same_groups() {
    let rules = yaml(RULES);
    if std::env::var_os("KLING_REGENERATE").is_some() {
        regenerate_operator_rule();
    }
    let crd = yaml(OPERATOR_RULE);
    assert_eq!(crd["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(crd["kind"], "PrometheusRule");
    assert_eq!(
        crd["spec"]["groups"], rules["groups"],
        "{OPERATOR_RULE} differs from {RULES}: run `KLING_REGENERATE=1 cargo test --test prometheus`"
    );
}

/// Rewrite the PrometheusRule's groups from rules.yaml, comments included.
fn regenerate_operator_rule() {
    let crd = read(OPERATOR_RULE);
    let head = crd.split_once("\n  groups:").expect("spec.groups").0;
    let rules = read(RULES);
    let groups = &rules[rules.find("\ngroups:").expect("groups") + 1..];
    let mut out = format!("{head}\n");
    for line in groups.lines() {
        if line.is_empty() {
            out.push('\n');
        } else {
            out.push_str(&format!("  {line}\n"));
        }
    }
    std::fs::write(root().join(OPERATOR_RULE), out).expect("write");
}

#[test]
fn the_dashboard_is_a_grafana_dashboard_on_a_datasource_variable() {
    let dash: serde_json::Value = serde_json::from_str(&read(DASHBOARD)).expect("JSON");
    assert!(dash["schemaVersion"].as_u64().unwrap() >= 39);
    let vars = dash["templating"]["list"].as_array().expect("variables");
    let ds = vars
        .iter()
        .find(|v| v["name"] == "datasource")
        .expect("a datasource variable");
    assert_eq!(
        (ds["type"].as_str(), ds["query"].as_str()),
        (Some("datasource"), Some("prometheus"))
    );
    let mut ids = BTreeSet::new();
    for p in dash["panels"].as_array().unwrap() {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate panel id");
        for d in std::iter::once(&p["datasource"]).chain(
            p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| &t["datasource"]),
        ) {
            assert_eq!(d["uid"], "${datasource}", "{}", p["title"]);
            assert_eq!(d["type"], "prometheus", "{}", p["title"]);
        }
    }
    let titles: String = panel_queries().iter().map(|q| q.0.to_lowercase()).collect();
    for needle in [
        "outcome",
        "code",
        "adaptive limit",
        "in flight",
        "latency",
        "cost",
        "bytes",
        "queue depth",
    ] {
        assert!(titles.contains(needle), "no panel on {needle}");
    }
}

/// A child process killed when the test ends, however it ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A real Prometheus on loopback with its own config and storage.
struct Prometheus {
    base: String,
    http: reqwest::Client,
    _child: Child,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    async fn start(worker: &str, rules: &str) -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join("rules.yaml"), rules).expect("rules");
        let config = format!(
            "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\n\
             rule_files: [{rules}]\n\
             scrape_configs:\n\
             \x20 - job_name: kling-archiver\n\
             \x20   static_configs: [{{ targets: ['{worker}'] }}]\n\
             \x20 - job_name: rabbitmq\n\
             \x20   metrics_path: /metrics/per-object\n\
             \x20   static_configs: [{{ targets: ['{RABBITMQ_METRICS}'] }}]\n",
            rules = dir.path().join("rules.yaml").display(),
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("config");
        let port = free_port();
        let log = dir.path().join("prometheus.log");
        let mut cmd = tool("prometheus");
        cmd.arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"));
        let child = Child(cmd.spawn().expect("start prometheus"));
        let p = Self {
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
            _child: child,
            _dir: dir,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let r = p.http.get(format!("{}/-/ready", p.base)).send().await;
            if r.is_ok_and(|r| r.status().is_success()) {
                return p;
            }
            if tokio::time::Instant::now() > deadline {
                let said = std::fs::read_to_string(&log).unwrap_or_default();
                panic!("Prometheus not ready within 30 s:\n{said}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// GET an API path with query parameters; the `data` of a success.
    async fn api(&self, path: &str, params: &[(&str, &str)]) -> serde_json::Value {
        let mut url = url::Url::parse(&format!("{}{path}", self.base)).expect("url");
        url.query_pairs_mut().extend_pairs(params);
        let body: serde_json::Value = self
            .http
            .get(url)
            .send()
            .await
            .expect("Prometheus answers")
            .json()
            .await
            .expect("JSON");
        assert_eq!(body["status"], "success", "{path} {params:?}: {body}");
        body["data"].clone()
    }

    /// An instant query's result vector.
    async fn query(&self, promql: &str) -> Vec<serde_json::Value> {
        let data = self.api("/api/v1/query", &[("query", promql)]).await;
        assert_eq!(data["resultType"], "vector", "{promql}");
        data["result"].as_array().cloned().unwrap_or_default()
    }

    /// Poll `f` until it yields, with a deadline.
    async fn until<T, F, Fut>(&self, what: &str, within: Duration, mut f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(v) = f().await {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: not within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// RabbitMQ's own exporter must answer: `tests/run.sh` enables it.
async fn require_rabbitmq_plugin() {
    let url = format!("http://{RABBITMQ_METRICS}/metrics/per-object");
    let ok = reqwest::get(&url)
        .await
        .is_ok_and(|r| r.status().is_success());
    assert!(
        ok,
        "RabbitMQ's rabbitmq_prometheus plugin does not answer at {url}. tests/run.sh enables it \
         (on loopback): `rabbitmqctl eval 'application:set_env(rabbitmq_prometheus, tcp_config, \
         [{{port, 15692}}, {{ip, \"127.0.0.1\"}}], [{{persistent, true}}]).' && \
         rabbitmq-plugins enable rabbitmq_prometheus`"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_real_prometheus_scraping_a_real_worker_answers_every_panel_and_rule() {
    require_rabbitmq_plugin().await;
    let env = TestEnv::new(Backend::S3).await;
    env.sim.set_latency(Duration::from_millis(300));
    let port = free_port();
    let worker = format!("127.0.0.1:{port}");
    let child = Child(
        common::worker_binary(&env)
            .env("HTTP_ADDR", &worker)
            .env("WORKER_CONCURRENCY", "2")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start worker"),
    );
    let rules = read(RULES).replace(RULES_QUEUE, &env.queue);
    let prom = Prometheus::start(&worker, &rules).await;
    // The worker is scraped before any job, so its counters' first
    // increments land inside Prometheus' windows.
    prom.until("the worker scraped", Duration::from_secs(30), || async {
        let up = prom.query(r#"up{job="kling-archiver"} == 1"#).await;
        (!up.is_empty()).then_some(())
    })
    .await;
    // RabbitMQ's exporter has seen the dead-letter queue empty, so one
    // dead letter is growth.
    let dead = format!(r#"rabbitmq_queue_messages{{queue="{}.dead"}}"#, env.queue);
    prom.until(
        "RabbitMQ's series for the test queues",
        Duration::from_secs(30),
        || async { (!prom.query(&dead).await.is_empty()).then_some(()) },
    )
    .await;
    // A small batch: eight good images (one out of spec) and one that
    // cannot be decoded, which is dead-lettered.
    let jobs = 8;
    for i in 0..jobs {
        let image = if i == 0 {
            jpeg(200, 100)
        } else {
            jpeg(400 + i, 400)
        };
        env.publish_json(
            serde_json::json!({"job_id": format!("prom-{i}"), "image_base64": b64(&image)}),
        )
        .await;
    }
    env.publish_json(
        serde_json::json!({"job_id": "prom-broken", "image_base64": b64(b"not an image")}),
    )
    .await;
    for (what, promql, n) in [
        (
            "jobs archived",
            r#"sum(kling_archiver_jobs_total{job="kling-archiver",outcome="archived"})"#.to_owned(),
            jobs,
        ),
        (
            "the dead letter",
            r#"sum(kling_archiver_jobs_total{job="kling-archiver",outcome="dead_lettered"})"#
                .to_owned(),
            1,
        ),
        ("the dead-letter queue's depth", format!("sum({dead})"), 1),
    ] {
        prom.until(
            &format!("Prometheus sees {what}"),
            Duration::from_secs(60),
            || async {
                let r = prom.query(&promql).await;
                let v = r
                    .first()
                    .and_then(|s| s["value"][1].as_str()?.parse::<f64>().ok());
                (v == Some(f64::from(n))).then_some(())
            },
        )
        .await;
    }

    check_panels(&prom, &env.queue).await;
    check_rules(&prom, &env.queue).await;
    check_job_variable(&prom).await;
    promtool_checks_the_workers_metrics(&worker).await;

    drop(child);
    assert_eq!(env.sim.stats().billed_calls, u64::from(jobs));
    let dead_letters = env.drain_dead_letters().await;
    assert_eq!(dead_letters.len(), 1, "{dead_letters:?}");
    env.cleanup().await;
}

/// Every panel query, with Grafana's variables set for this run, answers
/// without error and returns series.
async fn check_panels(prom: &Prometheus, queue: &str) {
    let mut empty = Vec::new();
    eprintln!("\npanel | refId | series | first value | query");
    for (title, ref_id, expr) in panel_queries() {
        let promql = expr
            .replace("$__rate_interval", "1m")
            .replace("$job", "kling-archiver")
            .replace("$queue", queue);
        let series = prom.query(&promql).await;
        let first = series.first().map(|s| s["value"][1].clone());
        eprintln!("{title} | {ref_id} | {} | {first:?} | {expr}", series.len());
        if series.is_empty() {
            empty.push(format!("{title} {ref_id}: {promql}"));
        }
    }
    assert!(
        empty.is_empty(),
        "panel queries without data:\n{}",
        empty.join("\n")
    );
}

/// The one alert the batch should trigger: its dead letter.
const EXPECTED_ALERT: &str = "KlingArchiverDeadLettersGrowing";

/// Every rule's expression answers without error; after the batch only
/// the dead-letter alert's returns series (from both RabbitMQ's exporter
/// and the worker's counter), while every metric a rule or panel reads has
/// series. Prometheus evaluates the loaded rules cleanly: that alert is
/// pending (its `for` has not passed), every other one inactive.
async fn check_rules(prom: &Prometheus, queue: &str) {
    let all = alerts();
    let mut names = BTreeSet::new();
    eprintln!("\nalert | series after the batch | query");
    for a in &all {
        let expr = a.expr.replace(RULES_QUEUE, queue);
        let series = prom.query(&expr).await;
        eprintln!(
            "{} | {} | {}",
            a.name,
            series.len(),
            expr.replace('\n', " ")
        );
        if a.name == EXPECTED_ALERT {
            assert_eq!(
                series.len(),
                2,
                "one per source, RabbitMQ and the worker: {series:?}"
            );
        } else {
            assert!(
                series.is_empty(),
                "{} fires on a healthy run: {series:?}",
                a.name
            );
        }
        names.extend(metric_names(&expr));
    }
    for (_, _, expr) in panel_queries() {
        names.extend(metric_names(&expr));
    }
    eprintln!("\nmetric | series");
    for name in &names {
        let n = prom.query(name).await.len();
        eprintln!("{name} | {n}");
        assert!(n > 0, "nothing scraped exports {name}");
    }
    // Mid-batch, calls lead archives and the cost ratio may pass 1 for an
    // evaluation (pending; its `for` is 10 minutes): wait for the settled
    // state, which a stuck rule never reaches.
    let settled = |rules: &[serde_json::Value]| {
        rules.iter().all(|r| {
            let want = if r["name"] == EXPECTED_ALERT {
                "pending"
            } else {
                "inactive"
            };
            r["health"] == "ok" && r["state"] == want
        })
    };
    let mut last = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        let data = prom.api("/api/v1/rules", &[]).await;
        last = data["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        if last.len() == all.len() && settled(&last) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("rules not settled (only {EXPECTED_ALERT} pending, all healthy): {last:#?}");
}

/// The dashboard's `job` variable (`label_values(kling_archiver_jobs_in_flight, job)`
/// in Grafana) lists the worker's scrape job.
async fn check_job_variable(prom: &Prometheus) {
    let dash: serde_json::Value = serde_json::from_str(&read(DASHBOARD)).expect("JSON");
    let var = dash["templating"]["list"]
        .as_array()
        .and_then(|l| l.iter().find(|v| v["name"] == "job"))
        .expect("a job variable");
    let def = var["definition"].as_str().expect("definition");
    let (metric, label) = def
        .strip_prefix("label_values(")
        .and_then(|d| d.strip_suffix(')'))
        .and_then(|d| d.split_once(", "))
        .expect("label_values(metric, label)");
    let values = prom
        .api(
            &format!("/api/v1/label/{label}/values"),
            &[("match[]", metric)],
        )
        .await;
    eprintln!("\nvariable job = {def}: {values}");
    assert_eq!(values, serde_json::json!(["kling-archiver"]));
}

/// `promtool check metrics` (the exposition format and Prometheus' naming
/// lints) on what the worker really serves.
async fn promtool_checks_the_workers_metrics(worker: &str) {
    let page = reqwest::get(format!("http://{worker}/metrics"))
        .await
        .expect("/metrics answers")
        .text()
        .await
        .expect("text");
    let mut cmd = tool("promtool");
    cmd.args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(page.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("promtool");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool check metrics refuses the worker's /metrics:\n{said}\n{page}"
    );
    let families = page.lines().filter(|l| l.starts_with("# TYPE ")).count();
    eprintln!("\npromtool check metrics: {families} metric families, clean{said}");
}
