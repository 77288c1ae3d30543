//! Shared harness for kiln's end-to-end tests.
