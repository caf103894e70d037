//! The concrete stage kinds: the only module that knows both the engine and the model.
//! A new kind is one file here plus one line in [`registry`].

use crate::exec::Registry;

/// Every stage kind the shipped binary offers.
pub fn registry() -> Registry {
    Registry::new()
}
