//! Property tests over hostile input: configuration text and paths inside a workspace.
//!
//! Each property runs `PROPTEST_CASES` cases (proptest's default is 256; `.ci/run` sets a larger
//! bounded number). A failing case is shrunk and printed, and proptest keeps it in
//! `proptest-regressions/` so it runs first next time.

use std::os::unix::fs::symlink;
use std::path::Path;

use derrick::config;
use derrick::paths::WorkspacePath;
use proptest::prelude::*;
use serde_json::{Value, json};

/// Generates JSON values of any shape, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        ".{0,12}".prop_map(Value::String),
        Just(json!("https://example.invalid/x.git")),
        Just(json!("/src")),
        Just(json!("../..")),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(field_name(), inner, 0..5)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

/// Generates the configuration's field names and a few unknown ones.
fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("name".to_owned()),
        Just("repositories".to_owned()),
        Just("url".to_owned()),
        Just("path".to_owned()),
        Just("reference".to_owned()),
        Just("setup_script".to_owned()),
        Just("env".to_owned()),
        Just("base_image".to_owned()),
        Just("credentials_env".to_owned()),
        "[a-z_]{1,8}",
    ]
}

/// Generates configuration objects whose fields hold arbitrary values or are left out.
fn config_object() -> impl Strategy<Value = Value> {
    (
        prop::option::of(json_value()),
        prop::option::of(json_value()),
        prop::option::of(json_value()),
        prop::option::of(json_value()),
    )
        .prop_map(|(name, repositories, setup_script, env)| {
            let mut object = serde_json::Map::new();
            for (key, value) in [
                ("name", name),
                ("repositories", repositories),
                ("setup_script", setup_script),
                ("env", env),
            ] {
                if let Some(value) = value {
                    object.insert(key.to_owned(), value);
                }
            }
            Value::Object(object)
        })
}

/// Generates path text from the parts that attacks use.
fn path_text() -> impl Strategy<Value = String> {
    let part = prop_oneof![
        Just(".."),
        Just("."),
        Just(""),
        Just("a"),
        Just("b"),
        Just("up"),
        Just("abs"),
        Just("loop"),
        Just("file.txt"),
        Just("..."),
    ];
    (any::<bool>(), prop::collection::vec(part, 0..8)).prop_map(|(absolute, parts)| {
        let joined = parts.join("/");
        if absolute {
            format!("/{joined}")
        } else {
            joined
        }
    })
}

/// Creates a workspace root with folders, a file and symbolic links that point out of it, inside it,
/// and in a loop.
fn workspace_with_traps() -> (tempfile::TempDir, std::path::PathBuf) {
    let outside = tempfile::tempdir().expect("temporary folder");
    let root = outside.path().join("root");
    std::fs::create_dir_all(root.join("a/b")).expect("folders");
    std::fs::write(root.join("a/file.txt"), "x").expect("file");
    std::fs::write(outside.path().join("secret.txt"), "secret").expect("secret");
    symlink("../..", root.join("a/up")).expect("relative link out");
    symlink("/", root.join("abs")).expect("absolute link out");
    symlink("b", root.join("a/inside")).expect("link inside");
    symlink("loop", root.join("loop")).expect("link loop");
    (outside, root)
}

proptest! {
    /// Any configuration text is either accepted or rejected with the file and a field named;
    /// parsing never panics.
    #[test]
    fn config_parse_never_panics(text in ".{0,200}") {
        let base = Path::new("/nonexistent-base");
        if let Err(error) = config::parse(&text, "fuzz.json", base) {
            prop_assert_eq!(error.file, "fuzz.json");
            prop_assert!(!error.field.is_empty());
            prop_assert!(!error.message.is_empty());
        }
    }

    /// Structurally plausible configurations: a rejection names a field, an acceptance has a
    /// valid name and absolute repository paths.
    #[test]
    fn config_objects_are_validated(object in config_object()) {
        let text = object.to_string();
        let base = Path::new("/nonexistent-base");
        match config::parse(&text, "fuzz.json", base) {
            Ok(parsed) => {
                prop_assert!(!parsed.name.is_empty());
                for repository in &parsed.repositories {
                    prop_assert!(repository.path.starts_with('/'), "{}", repository.path);
                    prop_assert!(!repository.path.contains(".."), "{}", repository.path);
                }
            }
            Err(error) => {
                prop_assert_eq!(error.file, "fuzz.json");
                prop_assert!(!error.field.is_empty());
            }
        }
    }

    /// No path, with or without a working directory, resolves outside the workspace root.
    #[test]
    fn paths_never_leave_the_root(path in path_text(), working_dir in prop::option::of(path_text())) {
        let (_outside, root) = workspace_with_traps();
        let canonical_root = root.canonicalize().expect("canonical root");
        match WorkspacePath::resolve(&root, &path, working_dir.as_deref()) {
            Ok(resolved) => {
                let host = resolved.host_path();
                prop_assert!(host.starts_with(&canonical_root), "{path:?} -> {}", host.display());
                if let Ok(real) = host.canonicalize() {
                    prop_assert!(real.starts_with(&canonical_root), "{path:?} -> {}", real.display());
                }
                prop_assert!(
                    !resolved.relative().components().any(|c| c == std::path::Component::ParentDir),
                    "{path:?} kept `..`"
                );
            }
            Err(error) => {
                let code = error.code();
                prop_assert!(
                    code == "path_outside_workspace" || code == "invalid_request",
                    "{path:?}: {code} {error}"
                );
            }
        }
    }
}
