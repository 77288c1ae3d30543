//! What the build gives a step on request: SSH agents (and, added by another
//! engineer, secrets).
//!
//! Everything here is prepared once at build start, so a bad key or a
//! missing agent fails the build before any step runs, and is then served to
//! each step that asks for it through its own socket. This module never
//! decides which step gets what (the engine does, from the step's mounts)
//! and never runs a process.

pub mod ssh;
