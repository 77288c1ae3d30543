//! kiln's snapshotter: content-addressed blobs, unpacked layers, and writable
//! views of layer chains. It owns bytes on disk and never sees a Dockerfile.

pub mod backend;
