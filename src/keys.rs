//! Content-hashed layer keys.
//!
//! Each key is the SHA-256 of a canonical JSON serialization: structs with a fixed field order and
//! `BTreeMap`s with sorted keys, never a `Debug` string or a `HashMap`. Equal configurations get
//! equal keys however their file was written, and any change of a layer's content gives a new key.
//!
//! Invariant: the `*Input` structs are a persisted format. Changing a field, its order or
//! `FORMAT_VERSION` changes every key and so invalidates every cached layer; the pinned keys in the
//! tests below make such a change visible.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{GitAuthor, WorkspaceConfig};

/// Version of the key inputs; bump it when the meaning of a layer's content changes.
pub const FORMAT_VERSION: u32 = 1;

/// A layer key: 64 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LayerKey(String);

/// The three layers of a workspace, from the bottom up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerKind {
    Base,
    Repositories,
    Setup,
}

/// The key chain of one configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerKeys {
    pub base: LayerKey,
    pub repositories: LayerKey,
    pub setup: LayerKey,
}

#[derive(Serialize)]
struct BaseInput<'a> {
    format: u32,
    layer: &'static str,
    provider: &'a str,
    base_image: Option<&'a str>,
}

#[derive(Serialize)]
struct RepositoriesInput<'a> {
    format: u32,
    layer: &'static str,
    parent: &'a LayerKey,
    repositories: Vec<RepositoryInput<'a>>,
    git_author: &'a GitAuthor,
}

#[derive(Serialize)]
struct RepositoryInput<'a> {
    url: &'a str,
    path: &'a str,
    reference: Option<&'a str>,
}

#[derive(Serialize)]
struct SetupInput<'a> {
    format: u32,
    layer: &'static str,
    parent: &'a LayerKey,
    setup_script: &'a str,
    env: &'a BTreeMap<String, String>,
}

impl LayerKey {
    /// Parses a stored key, checking its form.
    pub fn parse(text: &str) -> Option<LayerKey> {
        let valid = text.len() == 64
            && text
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        valid.then(|| LayerKey(text.to_owned()))
    }

    /// Returns the hex digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Returns the first 12 hex digits, enough to name an image tag or a log line.
    pub fn short(&self) -> &str {
        &self.0[..12]
    }

    fn of(input: &impl Serialize) -> LayerKey {
        let bytes = serde_json::to_vec(input)
            .expect("key inputs are plain structs of strings, which always serialize");
        LayerKey(hex::encode(Sha256::digest(bytes)))
    }
}

impl fmt::Display for LayerKey {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.0)
    }
}

impl LayerKind {
    /// Returns the name used in records and responses.
    pub fn as_str(self) -> &'static str {
        match self {
            LayerKind::Base => "base",
            LayerKind::Repositories => "repositories",
            LayerKind::Setup => "setup",
        }
    }
}

impl LayerKeys {
    /// Computes the key chain of `config` for a provider kind such as `local/overlay`.
    ///
    /// The repositories key covers the Git identity too, because it is written into every
    /// checkout's `.git/config`. The setup key covers the configuration's `env`, not the env of a
    /// create request, which only reaches later commands.
    pub fn compute(config: &WorkspaceConfig, provider: &str) -> LayerKeys {
        let base = LayerKey::of(&BaseInput {
            format: FORMAT_VERSION,
            layer: "base",
            provider,
            base_image: config.base_image.as_deref(),
        });
        let repositories = LayerKey::of(&RepositoriesInput {
            format: FORMAT_VERSION,
            layer: "repositories",
            parent: &base,
            repositories: config
                .repositories
                .iter()
                .map(|repository| RepositoryInput {
                    url: repository.url.as_str(),
                    path: &repository.path,
                    reference: repository.reference.as_deref(),
                })
                .collect(),
            git_author: &config.git_author,
        });
        let setup = LayerKey::of(&SetupInput {
            format: FORMAT_VERSION,
            layer: "setup",
            parent: &repositories,
            setup_script: &config.setup_script,
            env: &config.env,
        });
        LayerKeys {
            base,
            repositories,
            setup,
        }
    }

    /// Returns the key of one layer.
    pub fn get(&self, kind: LayerKind) -> &LayerKey {
        match kind {
            LayerKind::Base => &self.base,
            LayerKind::Repositories => &self.repositories,
            LayerKind::Setup => &self.setup,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config;

    const PROVIDER: &str = "local/overlay";

    fn keys_of(text: &str) -> LayerKeys {
        let config = config::parse(text, "test.json", Path::new("/")).expect("valid configuration");
        LayerKeys::compute(&config, PROVIDER)
    }

    fn fixture(name: &str) -> LayerKeys {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures")
            .join(name);
        let config = config::load(&path).expect("fixture is valid");
        LayerKeys::compute(&config, PROVIDER)
    }

    const BASE: &str = r#"{"name": "app", "repositories": [
        {"url": "https://git.example.com/team/app.git", "path": "/code/app", "reference": "main"},
        {"url": "https://git.example.com/team/lib.git", "path": "/code/lib", "reference": "v1.2.0"}],
        "setup_script": "make deps", "env": {"A": "1", "B": "2"}}"#;

    #[test]
    fn fixture_keys_are_pinned() {
        let example = fixture("example.json");
        assert_eq!(
            example.base.as_str(),
            "f50768878109ab47c5ebaa902611f5071c44e780dd7a723baceeb4bdf3737ec6"
        );
        assert_eq!(
            example.repositories.as_str(),
            "8831dd6549bad25a2074b86bd9e7c0d19a3a830112eed67f6a6f7d77fce50114"
        );
        assert_eq!(
            example.setup.as_str(),
            "b01eaa51156991d9f1beb0641a89829fef00bf435fa686a649593e776dceeca5"
        );
        let multi = fixture("multi-repository.json");
        assert_eq!(
            multi.base.as_str(),
            "e12207daf8858e39b1e89dd91fd029bcc5f79ba4a42446f908582ad532ae3698"
        );
        assert_eq!(
            multi.repositories.as_str(),
            "e4a07980c3c82c23aa251a1b26b7116104d339afa73363b45ec6b89b148d4382"
        );
        assert_eq!(
            multi.setup.as_str(),
            "2c3a878c28bda34043eb8a92716487c53326b6733862e4cf2ebff25a7ab8456a"
        );
    }

    #[test]
    fn field_and_env_order_do_not_change_keys() {
        let reordered = r#"{"setup_script": "make deps", "env": {"B": "2", "A": "1"}, "repositories": [
            {"reference": "main", "path": "/code/app", "url": "https://git.example.com/team/app.git"},
            {"path": "/code/lib", "reference": "v1.2.0", "url": "https://git.example.com/team/lib.git"}],
            "name": "app"}"#;
        assert_eq!(keys_of(BASE), keys_of(reordered));
    }

    #[test]
    fn name_does_not_change_keys() {
        assert_eq!(
            keys_of(BASE),
            keys_of(&BASE.replace(r#""name": "app""#, r#""name": "other""#))
        );
    }

    #[test]
    fn every_content_change_changes_keys() {
        let original = keys_of(BASE);
        let repository_changes = [
            ("team/app.git", "team/app2.git"),
            ("/code/app", "/code/app2"),
            (r#""reference": "main""#, r#""reference": "dev""#),
            ("v1.2.0", "v1.2.1"),
        ];
        for (from, to) in repository_changes {
            let changed = keys_of(&BASE.replace(from, to));
            assert_eq!(changed.base, original.base, "{from} -> {to}");
            assert_ne!(
                changed.repositories, original.repositories,
                "{from} -> {to}"
            );
            assert_ne!(changed.setup, original.setup, "{from} -> {to}");
        }
        let setup_changes = [
            ("make deps", "make deps2"),
            (r#""B": "2""#, r#""B": "3""#),
            (r#""B": "2""#, r#""C": "2""#),
        ];
        for (from, to) in setup_changes {
            let changed = keys_of(&BASE.replace(from, to));
            assert_eq!(
                changed.repositories, original.repositories,
                "{from} -> {to}"
            );
            assert_ne!(changed.setup, original.setup, "{from} -> {to}");
        }
    }

    #[test]
    fn provider_and_image_change_base_key() {
        let config = config::parse(BASE, "test.json", Path::new("/")).expect("valid");
        let overlay = LayerKeys::compute(&config, "local/overlay");
        assert_ne!(overlay.base, LayerKeys::compute(&config, "local/copy").base);
        let with_image = keys_of(&BASE.replace(
            r#""name": "app","#,
            r#""name": "app", "base_image": "debian:12","#,
        ));
        assert_ne!(with_image.base, overlay.base);
    }
}
