//! A registry's manifest or index is untrusted: kiln parses it and picks
//! the entry for the build's platform (`registry::resolve_document`, what
//! `kiln pull`, FROM and `--cache-from type=registry` do with every
//! document a registry sends). It must fail cleanly, never panic.
//!
//! Byte 0 picks the media type the registry claimed (or none, which makes
//! kiln guess from the JSON); the rest is the document.

#![no_main]

use kiln_builder::image::store::Platform;
use kiln_builder::registry::resolve_document;
use libfuzzer_sys::fuzz_target;

const MEDIA: [&str; 6] = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "",
    "text/plain",
];

fuzz_target!(|data: &[u8]| {
    let Some((&m, doc)) = data.split_first() else {
        return;
    };
    let media = MEDIA[usize::from(m) % MEDIA.len()];
    for platform in [
        Platform::host(),
        Platform {
            os: "linux".into(),
            architecture: "arm".into(),
            variant: Some("v7".into()),
            os_version: None,
        },
        Platform {
            os: "windows".into(),
            architecture: "amd64".into(),
            variant: None,
            os_version: Some("10.0.20348".into()),
        },
    ] {
        let _ = resolve_document("fuzz.example/x:1", media, doc, &platform);
    }
});
