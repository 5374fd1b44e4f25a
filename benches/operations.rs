//! Measures derrick under load and across a restart, against real `derrick` processes: 50
//! workspaces with 20 commands each at once over HTTP (throughput and command latency), and the
//! time a restarted derrick takes to re-adopt 50 workspaces.
//!
//! Run with `cargo bench --bench operations` as root; it prints Markdown for
//! `docs/benchmarks.md`.

#[path = "../tests/it/support/derrick.rs"]
#[expect(dead_code, reason = "the benchmark uses only part of the test harness")]
mod harness;
#[path = "../tests/it/support/repos.rs"]
#[expect(dead_code, reason = "the benchmark uses only part of the test helpers")]
mod repos;

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use harness::{Derrick, config};
use repos::TestRepo;

const WORKSPACES: usize = 50;
const COMMANDS_PER_WORKSPACE: usize = 20;

/// Restarts measured; each re-adopts `WORKSPACES` workspaces.
const RESTARTS: usize = 5;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let repository = TestRepo::with_files(100);
        let configuration = config(repository.path().display(), "echo ready > setup.txt");
        load(&configuration).await;
        readoption(&configuration).await;
    });
}

async fn load(configuration: &Value) {
    let derrick = Derrick::start(configuration);
    derrick.create().await;
    let client = reqwest::Client::new();
    let base = derrick.base_url().to_owned();

    let started = Instant::now();
    let mut agents = tokio::task::JoinSet::new();
    for _ in 0..WORKSPACES {
        let (client, base) = (client.clone(), base.clone());
        agents.spawn(async move {
            let created: Value = post(&client, &format!("{base}/workspaces"), json!({})).await;
            let id = created["id"].as_str().expect("id").to_owned();
            let url = format!("{base}/workspaces/{id}/cmd_with_output");
            let mut latencies = Vec::with_capacity(COMMANDS_PER_WORKSPACE);
            for command in 0..COMMANDS_PER_WORKSPACE {
                let body =
                    json!({ "cmd": format!("echo {command} >> log.txt; tail -n 1 log.txt") });
                let sent = Instant::now();
                let reply = post(&client, &url, body).await;
                latencies.push(sent.elapsed());
                assert_eq!(reply["exit_code"], 0, "{reply}");
            }
            latencies
        });
    }
    let mut latencies = Vec::new();
    while let Some(finished) = agents.join_next().await {
        latencies.extend(finished.expect("agent"));
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let commands = WORKSPACES * COMMANDS_PER_WORKSPACE;
    println!(
        "load: {WORKSPACES} creates (warm) and {commands} commands in {:.2} s: {:.0} commands/s",
        elapsed.as_secs_f64(),
        commands as f64 / elapsed.as_secs_f64()
    );
    println!(
        "command latency under load: p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms",
        millis(percentile(&latencies, 50)),
        millis(percentile(&latencies, 95)),
        millis(percentile(&latencies, 99)),
    );
}

async fn readoption(configuration: &Value) {
    let mut derrick = Derrick::start(configuration);
    for _ in 0..WORKSPACES {
        derrick.create().await;
    }
    let mut samples = Vec::new();
    for _ in 0..RESTARTS {
        let folder = derrick.into_folder();
        let started = Instant::now();
        derrick = Derrick::start_on(folder, configuration, &[], &[]);
        let listed = derrick.get("/workspaces").await.body;
        samples.push(started.elapsed());
        let count = listed["workspaces"].as_array().expect("workspaces").len();
        assert_eq!(count, WORKSPACES);
    }
    samples.sort();
    println!(
        "restart re-adopting {WORKSPACES} workspaces, until the list answers: p50 {:.0} ms, max {:.0} ms ({RESTARTS} restarts)",
        millis(percentile(&samples, 50)),
        millis(samples[samples.len() - 1]),
    );
}

async fn post(client: &reqwest::Client, url: &str, body: Value) -> Value {
    let response = client.post(url).json(&body).send().await.expect("request");
    response.json().await.expect("json reply")
}

fn percentile(sorted: &[Duration], percent: usize) -> Duration {
    let index = (sorted.len() * percent).div_ceil(100).saturating_sub(1);
    sorted[index.min(sorted.len() - 1)]
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}
