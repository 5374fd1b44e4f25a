//! Measures derrick end to end through its HTTP API, against real `derrick` processes and real Git
//! repositories: cold versus warm create, reset of a 5,000-file versus a 50,000-file repository,
//! the overhead of `cmd_with_output` over HTTP, over NATS and through a `remote_nats` controller
//! and worker against a raw `bash -c true`, and the throughput of creates through a controller
//! with one and with two workers.
//!
//! Run with `cargo bench --bench workspaces` as root; it prints a Markdown table for
//! `docs/benchmarks.md`. `DERRICK_BENCH_LAYERS=copy` measures the copy fallback instead, and
//! `DERRICK_BENCH_ONLY=commands` measures only the command overhead and the create throughput.
//! `DERRICK_BENCH_PROVIDER=docker` measures the docker provider: warm create and reset with and
//! without a spare container, and `cmd_with_output` against a raw exec through the engine's API.

#[path = "../tests/it/support/derrick.rs"]
#[expect(dead_code, reason = "the benchmark uses only part of the test harness")]
mod harness;
#[path = "../tests/it/support/repos.rs"]
#[expect(dead_code, reason = "the benchmark uses only part of the test helpers")]
mod repos;

use std::time::{Duration, Instant};

use serde_json::json;

use harness::nats::NatsServer;
use harness::remote::Cluster;
use harness::{Derrick, ProviderKind, Transport, config, wait_until};
use repos::TestRepo;

/// Samples per measurement; enough for a stable median on a 2-core machine within minutes.
const SAMPLES: usize = 20;

/// Cold creates are slow by design (a one-second setup), so fewer samples.
const COLD_SAMPLES: usize = 5;

/// Creates per throughput measurement, and how many run at once: enough concurrency that a
/// second worker could take work off the first.
const THROUGHPUT_CREATES: usize = 80;
const THROUGHPUT_CONCURRENCY: usize = 8;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let layers = std::env::var("DERRICK_BENCH_LAYERS").unwrap_or_else(|_| "overlay".to_owned());
    if std::env::var("DERRICK_BENCH_PROVIDER").as_deref() == Ok("docker") {
        runtime.block_on(docker_benchmarks());
        return;
    }
    let only_commands = std::env::var("DERRICK_BENCH_ONLY").is_ok_and(|only| only == "commands");
    runtime.block_on(async {
        println!("| measurement | samples | p50 | p95 |");
        println!("| --- | --- | --- | --- |");
        if !only_commands {
            create_cold_and_warm(&layers).await;
            for files in [5_000, 50_000] {
                reset(&layers, files).await;
            }
        }
        command_overhead(&layers).await;
        for workers in [1, 2] {
            create_throughput(&layers, workers).await;
        }
    });
}

async fn create_cold_and_warm(layers: &str) {
    let repository = TestRepo::with_files(100);
    let mut cold = Vec::new();
    for _ in 0..COLD_SAMPLES {
        let derrick = Derrick::start_with(
            &config(repository.path().display(), "sleep 1"),
            &["--layers", layers],
            &[],
        );
        let started = Instant::now();
        derrick.create().await;
        cold.push(started.elapsed());
    }
    report(
        &format!("create, cold, setup `sleep 1` ({layers})"),
        &mut cold,
    );

    let derrick = Derrick::start_with(
        &config(repository.path().display(), "sleep 1"),
        &["--layers", layers],
        &[],
    );
    derrick.create().await;
    let mut warm = Vec::new();
    for _ in 0..SAMPLES {
        let started = Instant::now();
        let created = derrick.create().await;
        warm.push(started.elapsed());
        assert_eq!(created["cache"]["hit"], "setup");
    }
    report(&format!("create, warm ({layers})"), &mut warm);
}

async fn reset(layers: &str, files: usize) {
    let repository = TestRepo::with_files(files);
    let derrick = Derrick::start_with(
        &config(repository.path().display(), ""),
        &["--layers", layers],
        &[],
    );
    let id = derrick.create_id().await;
    let mut samples = Vec::new();
    for round in 0..SAMPLES {
        derrick.output(&id, &format!("echo {round} > code/app/changed.txt && rm -f code/app/README.md && mkdir -p new && touch new/file")).await;
        let started = Instant::now();
        let reply = derrick
            .post(&format!("/workspaces/{id}/reset"), json!({}))
            .await;
        samples.push(started.elapsed());
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    report(&format!("reset, {files} files ({layers})"), &mut samples);
}

async fn command_overhead(layers: &str) {
    let repository = TestRepo::with_files(10);
    let derrick = Derrick::start_with(
        &config(repository.path().display(), ""),
        &["--layers", layers],
        &[],
    );
    let id = derrick.create_id().await;
    let mut through_derrick = Vec::new();
    let mut raw = Vec::new();
    for _ in 0..SAMPLES * 10 {
        let started = Instant::now();
        derrick.run(&id, "true").await;
        through_derrick.push(started.elapsed());

        let started = Instant::now();
        let status = std::process::Command::new("bash")
            .args(["-c", "true"])
            .status()
            .expect("bash");
        raw.push(started.elapsed());
        assert!(status.success());
    }
    report(
        &format!("`cmd_with_output` of `true` over HTTP ({layers})"),
        &mut through_derrick,
    );
    report("raw `bash -c true`", &mut raw);

    let configuration = config(repository.path().display(), "");
    let over_nats = Derrick::start_nats(
        NatsServer::start(),
        &configuration,
        &["--layers", layers],
        &[],
    );
    let mut samples = time_true_commands(&over_nats).await;
    report(
        &format!("`cmd_with_output` of `true` over NATS ({layers})"),
        &mut samples,
    );

    // Workers take the layer mode from their defaults (overlay as root), so this row is only
    // comparable with the overlay rows.
    let cluster = Cluster::start(&configuration, 1);
    let controller = cluster.controller(&configuration);
    let mut samples = time_true_commands(&controller).await;
    report(
        "`cmd_with_output` of `true`, HTTP controller, NATS, worker",
        &mut samples,
    );
}

/// Runs `THROUGHPUT_CREATES` warm creates, `THROUGHPUT_CONCURRENCY` at a time, through an HTTP
/// controller with `workers` workers, and prints the rate and the latency of each create.
async fn create_throughput(layers: &str, workers: usize) {
    let repository = TestRepo::with_files(100);
    let configuration = config(repository.path().display(), "sleep 1");
    let cluster = Cluster::start(&configuration, workers);
    let controller = std::sync::Arc::new(cluster.controller(&configuration));
    // Warm every worker's cache: creates go to random workers, so repeat until each has one.
    let mut warmed = std::collections::HashSet::new();
    while warmed.len() < workers {
        let id = controller.create_id().await;
        let owner = cluster
            .workers
            .iter()
            .find(|worker| worker.workspace_root(&id).exists())
            .expect("one worker contains the workspace");
        warmed.insert(owner.id().to_owned());
    }

    let semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(THROUGHPUT_CONCURRENCY));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..THROUGHPUT_CREATES {
        let controller = controller.clone();
        let permit = semaphore.clone().acquire_owned();
        tasks.spawn(async move {
            let _permit = permit.await.expect("semaphore open");
            let created_at = Instant::now();
            let created = controller.create().await;
            assert_eq!(created["cache"]["hit"], "setup");
            created_at.elapsed()
        });
    }
    let mut samples = tasks.join_all().await;
    let elapsed = started.elapsed();
    report(
        &format!(
            "create through a controller, {workers} worker(s), {THROUGHPUT_CONCURRENCY} at a time, \
             {:.0} creates/s ({layers})",
            THROUGHPUT_CREATES as f64 / elapsed.as_secs_f64()
        ),
        &mut samples,
    );
}

async fn docker_benchmarks() {
    println!("| measurement | samples | p50 | p95 |");
    println!("| --- | --- | --- | --- |");
    for spares in ["1", "0"] {
        docker_create_and_reset(spares).await;
    }
    docker_command_overhead().await;
}

/// Measures warm creates and resets of one derrick. With spares, each sample waits until a spare
/// container runs again, as it does between an agent's tasks, which are seconds apart.
async fn docker_create_and_reset(spares: &str) {
    let repository = TestRepo::with_files(100);
    let derrick = Derrick::start_provider(
        Transport::Http,
        ProviderKind::Docker,
        &config(repository.path().display(), ""),
        &["--spare-containers", spares],
        &[],
    );
    let label = if spares == "0" {
        "without spare"
    } else {
        "with spare"
    };
    let id = derrick.create_id().await;
    let record = derrick.get(&format!("/workspaces/{id}")).await.body;
    let setup_key = record["layers"][2]["key"].as_str().expect("setup key")[..12].to_owned();
    let scope = derrick::provider::docker::scope_of(&derrick.state_dir());
    // derrick logs each spare once it is in its pool, which is later than the engine lists it.
    // One spare follows the setup snapshot and one each take. Between tasks, the container
    // that the last reset discarded is gone too.
    let needle = format!("spare container ready layer_key={setup_key}");
    let ready_after = |taken: usize| {
        let log = derrick.log();
        let spare = spares == "0" || log.matches(&needle).count() > taken;
        spare && discarded_containers(&scope) == 0
    };

    let mut created = Vec::new();
    for round in 0..SAMPLES {
        assert!(wait_until(Duration::from_secs(30), || ready_after(round)).await);
        let started = Instant::now();
        let reply = derrick.create().await;
        created.push(started.elapsed());
        assert_eq!(reply["cache"]["hit"], "setup");
        let other = reply["id"].as_str().expect("id");
        derrick
            .request("DELETE", &format!("/workspaces/{other}"), None)
            .await;
    }
    report(&format!("docker create, warm, {label}"), &mut created);

    let mut resets = Vec::new();
    for round in 0..SAMPLES {
        derrick
            .output(&id, &format!("echo {round} > code/app/changed.txt"))
            .await;
        assert!(wait_until(Duration::from_secs(30), || ready_after(SAMPLES + round)).await);
        let started = Instant::now();
        let reply = derrick
            .post(&format!("/workspaces/{id}/reset"), json!({}))
            .await;
        resets.push(started.elapsed());
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    report(&format!("docker reset, {label}"), &mut resets);
}

async fn docker_command_overhead() {
    use bollard::exec::{CreateExecOptions, StartExecResults};
    use futures_util::StreamExt;

    let repository = TestRepo::with_files(10);
    let derrick = Derrick::start_for(
        Transport::Http,
        ProviderKind::Docker,
        &config(repository.path().display(), ""),
    );
    let id = derrick.create_id().await;
    let docker = bollard::Docker::connect_with_defaults()
        .expect("docker client")
        .negotiate_version()
        .await
        .expect("docker engine");
    let container = format!("derrick-{id}");
    let mut through_derrick = Vec::new();
    let mut raw = Vec::new();
    for _ in 0..SAMPLES * 10 {
        let started = Instant::now();
        derrick.run(&id, "true").await;
        through_derrick.push(started.elapsed());

        let started = Instant::now();
        let options = CreateExecOptions {
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            cmd: Some(vec!["true".to_owned()]),
            ..Default::default()
        };
        let exec = docker
            .create_exec(&container, options)
            .await
            .expect("create exec");
        if let StartExecResults::Attached { mut output, .. } =
            docker.start_exec(&exec.id, None).await.expect("start exec")
        {
            while output.next().await.is_some() {}
        }
        let inspected = docker.inspect_exec(&exec.id).await.expect("inspect exec");
        raw.push(started.elapsed());
        assert_eq!(inspected.exit_code, Some(0));
    }
    report(
        "docker `cmd_with_output` of `true` over HTTP",
        &mut through_derrick,
    );
    report("raw exec of `true` through the engine API", &mut raw);
}

/// Counts the containers of a derrick's scope that a reset discarded and that are not yet
/// removed.
fn discarded_containers(scope: &str) -> usize {
    let listed = std::process::Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--filter",
            &format!("label=dev.derrick.scope={scope}"),
            "--filter",
            "name=derrick-discarded-",
        ])
        .output()
        .expect("docker ps");
    String::from_utf8_lossy(&listed.stdout).lines().count()
}

/// Creates a workspace and times `SAMPLES * 10` runs of `cmd_with_output` of `true` in it.
async fn time_true_commands(derrick: &Derrick) -> Vec<Duration> {
    let id = derrick.create_id().await;
    let mut samples = Vec::new();
    for _ in 0..SAMPLES * 10 {
        let started = Instant::now();
        derrick.run(&id, "true").await;
        samples.push(started.elapsed());
    }
    samples
}

fn report(name: &str, samples: &mut [Duration]) {
    samples.sort();
    let percentile = |p: f64| samples[((samples.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "| {name} | {} | {:.1} ms | {:.1} ms |",
        samples.len(),
        millis(percentile(0.5)),
        millis(percentile(0.95))
    );
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}
