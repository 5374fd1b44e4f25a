//! The declared workspace state machine (`states/workspace.json`).
//!
//! The declaration is compiled in with `include_str!`, validated at start-up and in a test, and
//! is the only place that decides whether an operation is allowed in a state. The engine calls
//! `StateMachine::next` before every step and records what it returns.
//!
//! Invariant: the JSON file is a format that clients read through `GET /states`; renaming a
//! state or an operation is a compatibility decision.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

/// The declaration as shipped with this build.
pub const DECLARATION: &str = include_str!("../states/workspace.json");

/// A validated state machine.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateMachine {
    pub version: u32,
    pub initial: String,
    #[serde(rename = "final")]
    pub final_states: Vec<String>,
    /// State names with a one-line description each.
    pub states: BTreeMap<String, String>,
    pub transitions: Vec<Transition>,
}

/// One operation and the states it is allowed in.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Transition {
    pub op: String,
    pub from: Vec<String>,
    /// The state after the operation; `None` keeps the current state.
    pub to: Option<String>,
}

/// The reason an operation is not allowed, for the engine to turn into `invalid_transition`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Operations that the current state does allow, comma-separated.
    pub allowed: String,
}

impl StateMachine {
    /// Parses and validates the built-in declaration.
    ///
    /// # Errors
    /// Returns a message when the declaration is malformed, names an unknown state, has an
    /// unreachable state or a non-final state that cannot reach a final one.
    pub fn builtin() -> Result<StateMachine, String> {
        Self::parse(DECLARATION)
    }

    /// Parses and validates a declaration.
    ///
    /// # Errors
    /// See [`StateMachine::builtin`].
    pub fn parse(text: &str) -> Result<StateMachine, String> {
        let machine: StateMachine = serde_json::from_str(text)
            .map_err(|error| format!("states/workspace.json: {error}"))?;
        machine.validate()?;
        Ok(machine)
    }

    /// Returns the state after `op` in `state`: `Ok(Some(next))` for a change, `Ok(None)` for an
    /// allowed operation that keeps the state.
    ///
    /// # Errors
    /// Returns a `Refusal` listing what `state` allows when `op` is not declared for it.
    pub fn next(&self, state: &str, op: &str) -> Result<Option<&str>, Refusal> {
        let transition = self
            .transitions
            .iter()
            .find(|t| t.op == op && t.from.iter().any(|from| from == state));
        match transition {
            Some(transition) => Ok(transition.to.as_deref()),
            None => Err(Refusal {
                allowed: self.allowed_ops(state).join(", "),
            }),
        }
    }

    /// Returns the operations allowed in `state`, in declaration order.
    pub fn allowed_ops(&self, state: &str) -> Vec<&str> {
        let ops = self
            .transitions
            .iter()
            .filter(|t| t.from.iter().any(|from| from == state));
        ops.map(|t| t.op.as_str()).collect()
    }

    fn validate(&self) -> Result<(), String> {
        let known = |state: &str| self.states.contains_key(state);
        if !known(&self.initial) {
            return Err(format!("initial state `{}` is not declared", self.initial));
        }
        for state in &self.final_states {
            if !known(state) {
                return Err(format!("final state `{state}` is not declared"));
            }
        }
        for transition in &self.transitions {
            let targets = transition.from.iter().chain(transition.to.iter());
            if let Some(unknown) = targets.into_iter().find(|state| !known(state)) {
                return Err(format!(
                    "transition `{}` names undeclared state `{unknown}`",
                    transition.op
                ));
            }
            if let Some(final_state) = transition
                .from
                .iter()
                .find(|state| self.final_states.contains(state))
            {
                return Err(format!(
                    "transition `{}` leaves final state `{final_state}`",
                    transition.op
                ));
            }
        }

        let reachable = self.reachable_from(&self.initial);
        if let Some(state) = self.states.keys().find(|state| !reachable.contains(*state)) {
            return Err(format!(
                "state `{state}` is not reachable from `{}`",
                self.initial
            ));
        }
        for state in self
            .states
            .keys()
            .filter(|state| !self.final_states.contains(state))
        {
            let reachable = self.reachable_from(state);
            if !self
                .final_states
                .iter()
                .any(|final_state| reachable.contains(final_state))
            {
                return Err(format!("state `{state}` cannot reach a final state"));
            }
        }
        Ok(())
    }

    fn reachable_from(&self, start: &str) -> BTreeSet<String> {
        let mut seen = BTreeSet::from([start.to_owned()]);
        let mut queue = VecDeque::from([start.to_owned()]);
        while let Some(state) = queue.pop_front() {
            for transition in self.transitions.iter().filter(|t| t.from.contains(&state)) {
                if let Some(to) = &transition.to
                    && seen.insert(to.clone())
                {
                    queue.push_back(to.clone());
                }
            }
        }
        seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_declaration_is_valid() {
        let machine = StateMachine::builtin().expect("the shipped declaration is valid");
        assert_eq!(machine.initial, "provisioned");
        assert_eq!(machine.final_states, ["destroyed"]);
        assert_eq!(machine.states.len(), 8);
    }

    #[test]
    fn lifecycle_transitions_follow_declaration() {
        let machine = StateMachine::builtin().expect("valid");
        let cases = [
            ("provisioned", "clone", Ok(Some("cloned"))),
            ("cloned", "setup", Ok(Some("setup"))),
            ("setup", "snapshot", Ok(Some("clean_snapshotted"))),
            ("provisioned", "restore", Ok(Some("clean_snapshotted"))),
            ("clean_snapshotted", "exec", Ok(Some("running"))),
            ("running", "reset", Ok(Some("reset"))),
            ("reset", "restore", Ok(Some("clean_snapshotted"))),
            ("running", "read", Ok(None)),
            ("failed", "destroy", Ok(Some("destroyed"))),
        ];
        for (state, op, expected) in cases {
            assert_eq!(
                machine.next(state, op).map_err(|_| ()),
                expected.map_err(|_: ()| ()),
                "{op} in {state}"
            );
        }
    }

    #[test]
    fn undeclared_operation_lists_allowed_ones() {
        let machine = StateMachine::builtin().expect("valid");
        let refusal = machine
            .next("failed", "exec")
            .expect_err("exec is not allowed in failed");
        assert_eq!(refusal.allowed, "destroy");
        assert!(machine.next("destroyed", "destroy").is_err());
    }

    #[test]
    fn unreachable_state_is_rejected() {
        let text = r#"{"version": 1, "initial": "a", "final": ["z"], "states": {"a": "", "b": "", "z": ""},
            "transitions": [{"op": "end", "from": ["a", "b"], "to": "z"}]}"#;
        let error = StateMachine::parse(text).expect_err("b is unreachable");
        assert_eq!(error, "state `b` is not reachable from `a`");
    }

    #[test]
    fn dead_end_state_is_rejected() {
        let text = r#"{"version": 1, "initial": "a", "final": ["z"], "states": {"a": "", "b": "", "z": ""},
            "transitions": [{"op": "go", "from": ["a"], "to": "b"}, {"op": "end", "from": ["a"], "to": "z"}]}"#;
        let error = StateMachine::parse(text).expect_err("b cannot reach z");
        assert_eq!(error, "state `b` cannot reach a final state");
    }
}
