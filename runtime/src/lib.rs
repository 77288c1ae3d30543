//! kiln's rootless executor: runs one process in a sandbox described by an
//! OCI runtime spec. It never sees an image, a layer or a Dockerfile.
