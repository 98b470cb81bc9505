//! A gateway's kernel state: what it holds and how it differs from a plan
//! (`state`, pure), and the sync, audit and teardown procedures that run
//! on the namespace's worker (`engine`).

pub(crate) mod engine;
pub mod state;
