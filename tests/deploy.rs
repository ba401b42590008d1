//! The deploy files cannot be run here (no Docker engine, no cluster), so
//! they are checked against the binary: every variable they set is one the
//! worker reads, probes hit the paths and port the worker serves, the grace
//! period covers the shutdown timeout, and the RabbitMQ definitions declare
//! exactly the topology the worker declares.

use std::collections::BTreeSet;
use std::path::Path;

use clap::CommandFactory;
use kling_archiver::broker::Topology;
use kling_archiver::config::Cli;
use serde_yaml_ng::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn yaml_docs(rel: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap_or_else(|e| panic!("{rel}: {e}")))
        .collect()
}

/// Every environment variable the binary reads.
fn known_env() -> BTreeSet<String> {
    fn walk(cmd: &clap::Command, out: &mut BTreeSet<String>) {
        for arg in cmd.get_arguments() {
            if let Some(env) = arg.get_env() {
                out.insert(env.to_string_lossy().into_owned());
            }
        }
        for sub in cmd.get_subcommands() {
            walk(sub, out);
        }
    }
    let mut out = BTreeSet::new();
    walk(&Cli::command(), &mut out);
    // Read outside clap: secrets (and their *_FILE forms), the AWS SDK's
    // standard variables, the log filter.
    for v in [
        "KLING_ACCESS_KEY",
        "KLING_SECRET_KEY",
        "KLING_ACCESS_KEY_FILE",
        "KLING_SECRET_KEY_FILE",
        "AWS_ENDPOINT_URL",
        "AWS_REGION",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "RUST_LOG",
    ] {
        out.insert(v.into());
    }
    out
}

/// A Kubernetes memory quantity (`1280Mi`, `3Gi`, `2G`) in MiB, rounded down.
fn mebibytes(v: &Value) -> u64 {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("memory {v:?} is not a string"));
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
    let bytes = n * match unit {
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "K" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "" => 1,
        _ => panic!("{s}: unknown unit"),
    };
    bytes >> 20
}

fn get<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(v, |v, k| &v[*k])
}

#[test]
fn the_kubernetes_deployment_matches_the_binary() {
    let docs = yaml_docs("deploy/k8s/deployment.yaml");
    let d = &docs[0];
    assert_eq!(d["kind"], "Deployment");
    let pod = get(d, &["spec", "template", "spec"]);
    let c = &pod["containers"][0];
    let known = known_env();
    let mut env = std::collections::BTreeMap::new();
    for e in c["env"].as_sequence().unwrap() {
        let name = e["name"].as_str().unwrap();
        assert!(known.contains(name), "the worker does not read {name}");
        if let Some(v) = e["value"].as_str() {
            env.insert(name.to_owned(), v.to_owned());
        }
    }
    // Probes hit what the ops listener serves, on its port.
    assert_eq!(get(c, &["livenessProbe", "httpGet", "path"]), "/healthz");
    assert_eq!(get(c, &["readinessProbe", "httpGet", "path"]), "/readyz");
    let port = c["ports"][0]["containerPort"].as_u64().unwrap();
    assert!(env["HTTP_ADDR"].ends_with(&format!(":{port}")));
    // SIGKILL comes after the shutdown timeout and the longest Kling call
    // (a call outlives its aborted job to store its billed answer), with
    // margin.
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    let shutdown: u64 = env["SHUTDOWN_TIMEOUT_SECS"].parse().unwrap();
    let call: u64 = env
        .get("KLING_REQUEST_TIMEOUT_SECS")
        .map_or(120, |v| v.parse().unwrap());
    assert!(
        grace >= shutdown + call + 10 + 15,
        "grace {grace}s vs shutdown {shutdown}s + longest call {call}s + 10s record write"
    );
    // The job deadline stays under RabbitMQ's default consumer_timeout.
    let deadline: u64 = env["JOB_DEADLINE_SECS"].parse().unwrap();
    assert!(deadline < 30 * 60, "JOB_DEADLINE_SECS {deadline}");
    // Every flag value the Deployment sets parses.
    let mut args = vec!["worker".to_owned()];
    for (k, v) in &env {
        if let Some(flag) = Cli::command()
            .get_arguments()
            .find(|a| a.get_env().is_some_and(|e| e == k.as_str()))
            .and_then(|a| a.get_long())
        {
            args.push(format!("--{flag}={v}"));
        }
    }
    if let Err(e) = <Cli as clap::Parser>::try_parse_from(&args) {
        panic!("{args:?}: {e}");
    }
    // Memory request and limit follow the flags (docs/operations.md).
    let cfg = <Cli as clap::Parser>::try_parse_from(&args)
        .unwrap()
        .worker
        .into_config_with_keys("ak".into(), "sk".to_owned().into())
        .expect("the deployment's flags validate");
    let (want_request, want_limit) = kling_archiver::budget::pod_memory_mib(
        cfg.memory_budget_mb,
        cfg.pixel_budget,
        cfg.prefetch,
    );
    let request = mebibytes(get(c, &["resources", "requests", "memory"]));
    let limit = mebibytes(get(c, &["resources", "limits", "memory"]));
    assert!(
        request >= want_request && limit >= want_limit && request <= limit,
        "memory request {request} Mi / limit {limit} Mi; the flags call for at least {want_request} / {want_limit} Mi"
    );
    // Secrets only as Secret references or mounted files.
    for e in c["env"].as_sequence().unwrap() {
        let name = e["name"].as_str().unwrap();
        if name == "AMQP_URL" || name == "KLING_SECRET_KEY" || name == "KLING_ACCESS_KEY" {
            assert!(e["value"].is_null(), "{name} must come from a Secret");
        }
    }
}

#[test]
fn keda_scales_the_deployment_on_the_job_queue() {
    let docs = yaml_docs("deploy/k8s/keda-scaledobject.yaml");
    let so = docs.iter().find(|d| d["kind"] == "ScaledObject").unwrap();
    assert_eq!(
        get(so, &["spec", "scaleTargetRef", "name"]),
        "kling-archiver"
    );
    let trigger = &so["spec"]["triggers"][0];
    assert_eq!(trigger["type"], "rabbitmq");
    assert_eq!(
        trigger["metadata"]["queueName"],
        kling_archiver::config::DEFAULT_QUEUE
    );
    let auth = trigger["authenticationRef"]["name"].as_str().unwrap();
    assert!(
        docs.iter()
            .any(|d| d["kind"] == "TriggerAuthentication" && d["metadata"]["name"] == auth)
    );
    let secret = &yaml_docs("deploy/k8s/secret.example.yaml")[0];
    for d in &docs {
        if let Some(refs) = d["spec"]["secretTargetRef"].as_sequence() {
            for r in refs {
                let key = r["key"].as_str().unwrap();
                assert!(!secret["stringData"][key].is_null(), "secret key {key}");
            }
        }
    }
}

#[test]
fn compose_uses_only_variables_the_worker_reads() {
    let docs = yaml_docs("deploy/compose.yaml");
    let c = &docs[0];
    let known = known_env();
    for svc in ["rabbitmq", "s3", "sim", "worker"] {
        assert!(!c["services"][svc].is_null(), "service {svc}");
    }
    for svc in ["worker", "sim", "enqueue"] {
        let env = c["services"][svc]["environment"].as_mapping().unwrap();
        for (k, _) in env {
            let k = k.as_str().unwrap();
            assert!(known.contains(k), "{svc}: the worker does not read {k}");
        }
    }
    // The definitions file it mounts exists.
    assert!(root().join("deploy/rabbitmq/definitions.json").exists());
}

#[test]
fn rabbitmq_definitions_declare_the_workers_topology() {
    let text = std::fs::read_to_string(root().join("deploy/rabbitmq/definitions.json")).unwrap();
    let defs: serde_json::Value = serde_json::from_str(&text).unwrap();
    let t = Topology::new(kling_archiver::config::DEFAULT_QUEUE, 10);
    let queue = |name: &str| {
        defs["queues"]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["name"] == name)
            .unwrap_or_else(|| panic!("queue {name}"))
            .clone()
    };
    let as_json = |args: &lapin::types::FieldTable| -> serde_json::Value {
        args.inner()
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    lapin::types::AMQPValue::LongString(s) => serde_json::json!(s.to_string()),
                    lapin::types::AMQPValue::LongInt(n) => serde_json::json!(n),
                    lapin::types::AMQPValue::LongLongInt(n) => serde_json::json!(n),
                    other => panic!("{other:?}"),
                };
                (k.to_string(), v)
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    assert_eq!(
        queue(&t.queue)["arguments"],
        as_json(&t.job_queue_arguments())
    );
    assert_eq!(
        queue(&t.dead_letter_queue())["arguments"],
        as_json(&t.dead_queue_arguments())
    );
    for delay in &t.retry_delays {
        assert_eq!(
            queue(&t.retry_queue(*delay))["arguments"],
            as_json(&t.retry_queue_arguments(*delay))
        );
    }
    assert_eq!(
        defs["queues"].as_array().unwrap().len(),
        2 + t.retry_delays.len()
    );
    let exchange = |name: &str| {
        defs["exchanges"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("exchange {name}"))
            .clone()
    };
    assert_eq!(exchange(&t.dead_letter_exchange())["type"], "direct");
    assert_eq!(exchange(&t.results_exchange())["type"], "fanout");
    assert_eq!(exchange(&t.results_exchange())["durable"], true);
    let b = &defs["bindings"][0];
    assert_eq!(b["source"], t.dead_letter_exchange());
    assert_eq!(b["destination"], t.dead_letter_queue());
    assert_eq!(b["routing_key"], t.queue.as_str());
}
