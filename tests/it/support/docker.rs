//! The Docker engine of the docker provider's tests: the test base image, built once per run
//! without a registry by `tests/docker/build-test-image`, and clean-up of what a test derrick
//! created.

use std::process::Command;
use std::sync::OnceLock;

/// The base image of docker workspaces in tests: busybox and git, nothing pulled.
pub const TEST_IMAGE: &str = "derrick-test/base:1";

/// Builds the test image if it is missing and returns its reference. Fails the test, naming what
/// to start, when no engine responds.
pub fn test_image() -> &'static str {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let info = Command::new("docker").arg("info").output();
        if !info.is_ok_and(|output| output.status.success()) {
            return Err(
                "no docker engine answers `docker info`; start dockerd (`.ci/run` \
                        does) before the docker tests"
                    .to_owned(),
            );
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/docker/build-test-image");
        let status = Command::new(script).arg(TEST_IMAGE).status();
        match status {
            Ok(status) if status.success() => Ok(()),
            other => Err(format!("{script} failed: {other:?}")),
        }
    });
    if let Err(message) = built {
        panic!("{message}");
    }
    TEST_IMAGE
}

/// Tells whether the container of workspace `id` exists.
pub fn container_exists(id: &str) -> bool {
    Command::new("docker")
        .args(["container", "inspect", &format!("derrick-{id}")])
        .output()
        .is_ok_and(|output| output.status.success())
}

/// Runs `docker exec` in the container of workspace `id` and returns its stdout.
pub fn exec(id: &str, args: &[&str]) -> String {
    let output = Command::new("docker")
        .arg("exec")
        .arg(format!("derrick-{id}"))
        .args(args)
        .output()
        .expect("run docker exec");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Removes every container of a derrick's scope (see `derrick::provider::docker::scope_of`):
/// what a derrick that could not reach the engine, or crashed, left behind.
pub fn remove_containers_of(scope: &str) {
    let listed = Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--filter",
            &format!("label=dev.derrick.scope={scope}"),
        ])
        .output();
    let Ok(listed) = listed else { return };
    let ids: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    if !ids.is_empty() {
        let _ = Command::new("docker")
            .args(["rm", "-f"])
            .args(&ids)
            .output();
    }
}

/// Removes the repositories and setup layer images that a test's configuration `name` built.
/// Each docker test has a configuration name of its own, so no other test loses an image. Base
/// layers stay, because their key depends only on the base image and every docker test shares it.
pub fn remove_layers_of(name: &str) {
    let mut ids = Vec::new();
    // A child image goes before its parent, as the engine requires.
    for kind in ["setup", "repositories"] {
        let listed = Command::new("docker")
            .args([
                "images",
                "-q",
                "--filter",
                &format!("label=dev.derrick.layer.config={name}"),
                "--filter",
                &format!("label=dev.derrick.layer.kind={kind}"),
            ])
            .output();
        let Ok(listed) = listed else { return };
        ids.extend(
            String::from_utf8_lossy(&listed.stdout)
                .split_whitespace()
                .map(str::to_owned),
        );
    }
    if !ids.is_empty() {
        let _ = Command::new("docker")
            .args(["rmi", "-f"])
            .args(&ids)
            .output();
    }
}
